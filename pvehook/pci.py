"""PCI addresses and the kernel's view of one PCI function (sysfs).

The kernel names a function `DDDD:BB:SS.F` (Documentation/ABI/testing/sysfs-bus-pci);
Proxmox's hostpci accepts `[DDDD:]BB:SS[.F]`, where an id without function means every
function of that slot.
"""

from __future__ import annotations

import os
import re
from collections import namedtuple
from pathlib import Path

from .errors import ConfigError
from .paths import Root

_ID_RE = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{4}):)?(?P<bus>[0-9a-fA-F]{2}):(?P<slot>[0-9a-fA-F]{2})"
    r"(?:\.(?P<function>[0-7]))?$"
)

# PCI class codes (include/linux/pci_ids.h): base class, subclass.
CLASS_NVME = 0x0108  # mass storage / non-volatile memory controller
CLASS_BRIDGE = 0x06


class PciAddress(namedtuple("PciAddress", "domain bus slot function")):
    """A tuple of ints: hashable, and ordered as the kernel lists devices."""

    __slots__ = ()

    @classmethod
    def parse(cls, text: str) -> "PciAddress":
        sel = PciSelector.parse(text)
        if sel.function is None:
            raise ConfigError(f"PCI address {text!r} has no function number")
        return cls(sel.domain, sel.bus, sel.slot, sel.function)

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"


class PciSelector(namedtuple("PciSelector", "domain bus slot function")):
    """A hostpci id: one function, or with function None all functions of a slot."""

    __slots__ = ()

    @classmethod
    def parse(cls, text: str) -> "PciSelector":
        m = _ID_RE.match(text.strip())
        if not m:
            raise ConfigError(f"not a PCI id: {text!r} (expected [domain:]bus:slot[.function])")
        fn = m["function"]
        return cls(
            int(m["domain"] or "0000", 16),
            int(m["bus"], 16),
            int(m["slot"], 16),
            int(fn, 16) if fn is not None else None,
        )

    def matches(self, addr: PciAddress) -> bool:
        return (
            (self.domain, self.bus, self.slot) == (addr.domain, addr.bus, addr.slot)
            and self.function in (None, addr.function)
        )

    def __str__(self) -> str:
        base = f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}"
        return base if self.function is None else f"{base}.{self.function:x}"


def class_devices_under(root: Root, cls: str, sys_dir) -> list[tuple[str, Path]]:
    """(name, real directory) of every /sys/class/<cls> device that sits under `sys_dir`
    (a PCI function's disks behind ata/host/target, its net interfaces, at any depth)."""
    base = root.sys("class", cls)
    real = os.path.realpath(sys_dir) + os.sep
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        path = os.path.realpath(base / name)
        if path.startswith(real):
            out.append((name, Path(path)))
    return out


class PciDevice:
    """One PCI function as sysfs shows it; every read goes to the kernel again."""

    def __init__(self, root: Root, address: PciAddress):
        self.root = root
        self.address = address
        self.sys_path = root.sys("bus", "pci", "devices", str(address))

    @classmethod
    def all(cls, root: Root) -> list["PciDevice"]:
        base = root.sys("bus", "pci", "devices")
        try:
            names = sorted(os.listdir(base))
        except FileNotFoundError:
            return []
        return [cls(root, PciAddress.parse(n)) for n in names if _ID_RE.match(n)]

    def exists(self) -> bool:
        return self.sys_path.exists()

    def _read(self, name: str) -> str:
        return (self.sys_path / name).read_text().strip()

    @property
    def driver(self) -> str | None:
        try:
            return os.path.basename(os.readlink(self.sys_path / "driver"))
        except FileNotFoundError:
            return None

    @property
    def driver_override(self) -> str | None:
        try:
            value = self._read("driver_override")
        except FileNotFoundError:
            return None
        return None if value in ("", "(null)") else value

    @property
    def class_code(self) -> int:
        """The 24-bit class (base, subclass, prog-if), e.g. 0x010802 for NVMe."""
        return int(self._read("class"), 16)

    @property
    def vendor_device(self) -> str:
        return f"{int(self._read('vendor'), 16):04x}:{int(self._read('device'), 16):04x}"

    @property
    def is_nvme(self) -> bool:
        return self.class_code >> 8 == CLASS_NVME

    @property
    def is_bridge(self) -> bool:
        return self.class_code >> 16 == CLASS_BRIDGE

    @property
    def iommu_group(self) -> str | None:
        try:
            return os.path.basename(os.readlink(self.sys_path / "iommu_group"))
        except FileNotFoundError:
            return None
