"""Native NVMe multipath: the other controllers through which a namespace is reachable.

With native multipath a controller `nvmeC` of subsystem S holds a hidden path
`nvme<S>c<C>n<Y>` per namespace; the disk the host uses is the head `nvme<S>nY`, which
stays as long as any path does. The subsystem's controllers are the `nvmeN` links in
/sys/class/nvme-subsystem/nvme-subsys<S>/. Passing one controller of a shared namespace
to a VM leaves that namespace on the host through the others: both would write it.
"""

from __future__ import annotations

import os
import re
from collections import namedtuple
from pathlib import Path

from .block import controller_entries
from .pci import PciAddress, PciDevice

_PATH_RE = re.compile(r"^nvme(\d+)c(\d+)n(\d+)$")
_CTRL_RE = re.compile(r"^nvme(\d+)$")
_PCI_RE = re.compile(r"^[0-9a-f]{4,}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


class OtherPath(namedtuple("OtherPath", "head controller address")):
    """`head` nvmeSnY; `controller` nvmeC; `address` its PCI function, or None for a
    controller that is not on PCI (NVMe over Fabrics: TCP, RDMA, FC)."""

    __slots__ = ()

    def __str__(self) -> str:
        where = str(self.address) if self.address else "not a PCI device (NVMe over Fabrics)"
        return f"{self.controller} ({where})"


def _pci_function(ctrl_dir: Path) -> PciAddress | None:
    """The controller's parent device (its `device` link; in a tree without one, the
    function above its nvme/ directory), when that is a PCI function."""
    link = ctrl_dir / "device"
    if os.path.lexists(link):
        parent = os.path.realpath(link)
    elif ctrl_dir.parent.name == "nvme":
        parent = str(ctrl_dir.parent.parent)
    else:
        return None
    name = os.path.basename(parent)
    return PciAddress.parse(name) if _PCI_RE.match(name) else None


def other_paths(dev: PciDevice) -> list[OtherPath]:
    """Every path to a namespace of `dev`'s controllers through a controller not under
    `dev`."""
    root = dev.root
    out: list[OtherPath] = []
    for ctrl, entries in controller_entries(dev):
        for name in entries:
            m = _PATH_RE.match(name)
            if not m:
                continue
            subsys, ns = m[1], m[3]
            head = f"nvme{subsys}n{ns}"
            subdir = root.sys("class", "nvme-subsystem", f"nvme-subsys{subsys}")
            try:
                members = sorted(os.listdir(subdir))
            except OSError:
                continue
            for other in members:
                cm = _CTRL_RE.match(other)
                if not cm or other == ctrl:
                    continue
                odir = Path(os.path.realpath(subdir / other))
                if not (odir / f"nvme{subsys}c{cm[1]}n{ns}").exists():
                    continue  # a controller of the subsystem without this namespace
                addr = _pci_function(odir)
                if addr == dev.address:
                    continue
                out.append(OtherPath(head, other, addr))
    return out
