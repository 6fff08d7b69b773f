"""The block devices of an NVMe controller, as sysfs and the udev database show them.

A controller `nvmeX` sits under its PCI function at <pci>/nvme/nvmeX. Its namespaces are
either plain disks `nvmeXnY` right there, or, with native multipath, hidden paths
`nvmeXcCnY` whose disk is the shared head `nvmeSnY` (S the subsystem's instance) in
/sys/block. Names change across a rebind, so callers identify a controller by PCI address.
"""

from __future__ import annotations

import os
import re
from collections import namedtuple
from pathlib import Path

from .paths import Root
from .pci import PciDevice

_DISK_RE = re.compile(r"^nvme\d+n\d+$")
_PATH_RE = re.compile(r"^nvme(\d+)c\d+n(\d+)$")


class BlockDevice(namedtuple("BlockDevice", "root name sys_path")):
    """`name` as the kernel has it (nvme0n1, nvme0n1p1, dm-0); `sys_path` its real
    directory under /sys/devices."""

    __slots__ = ()

    @classmethod
    def by_name(cls, root: Root, name: str) -> "BlockDevice":
        return cls(root, name, Path(os.path.realpath(root.sys("class", "block", name))))

    @property
    def devnum(self) -> str:
        """major:minor, as in /proc/self/mountinfo and /run/udev/data/b<devnum>."""
        return (self.sys_path / "dev").read_text().strip()

    @property
    def dev_path(self) -> Path:
        return self.root.dev(self.name)

    @property
    def is_partition(self) -> bool:
        return (self.sys_path / "partition").exists()

    def exists(self) -> bool:
        return (self.sys_path / "dev").exists()

    def partitions(self) -> list["BlockDevice"]:
        try:
            entries = sorted(os.listdir(self.sys_path))
        except FileNotFoundError:
            return []
        return [BlockDevice(self.root, n, self.sys_path / n) for n in entries
                if n.startswith(self.name) and (self.sys_path / n / "partition").exists()]

    def holders(self) -> list["BlockDevice"]:
        try:
            names = sorted(os.listdir(self.sys_path / "holders"))
        except FileNotFoundError:
            return []
        return [BlockDevice.by_name(self.root, n) for n in names]

    def slaves(self) -> list[str]:
        """Names of the devices this one is built on (an md array's members)."""
        try:
            return sorted(os.listdir(self.sys_path / "slaves"))
        except FileNotFoundError:
            return []

    def holder_stack(self) -> list["BlockDevice"]:
        """Every device stacked on this one, transitively (dm on md on a partition...)."""
        out: list[BlockDevice] = []
        todo = self.holders()
        while todo:
            h = todo.pop(0)
            if h.name not in {o.name for o in out}:
                out.append(h)
                todo.extend(h.holders())
        return out

    @property
    def dm_name(self) -> str | None:
        try:
            return (self.sys_path / "dm" / "name").read_text().strip()
        except FileNotFoundError:
            return None

    @property
    def dm_uuid(self) -> str | None:
        try:
            return (self.sys_path / "dm" / "uuid").read_text().strip()
        except FileNotFoundError:
            return None

    def label(self) -> str:
        return f"{self.name} ({self.dm_name})" if self.dm_name else self.name

    def udev(self) -> dict[str, str] | None:
        """The udev database entry, or None while udev has not processed the device.

        Read straight from /run/udev/data (what libudev reads too): importing pyudev
        costs more than the rest of a pre-start, and the hook runs at every VM start.
        """
        try:
            text = self.root.run("udev", "data", f"b{self.devnum}").read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None
        props = {}
        for line in text.splitlines():
            if line.startswith("E:") and "=" in line:
                key, _, value = line[2:].partition("=")
                props[key] = value
        # pvehook's udev rule hides a guest disk's ID_FS_TYPE from lvm2's and mdadm's
        # rules and its second rule puts it back; should that one be missing, the
        # original is still here.
        if "ID_FS_TYPE" not in props and "PVEHOOK_ID_FS_TYPE" in props:
            props["ID_FS_TYPE"] = props["PVEHOOK_ID_FS_TYPE"]
        return props


def controller_entries(dev: PciDevice) -> list[tuple[str, list[str]]]:
    """(nvmeX, the names in its sysfs directory) of every NVMe controller under this PCI
    function: its namespaces nvmeXnY, or its multipath paths nvmeScXnY."""
    base = dev.sys_path / "nvme"
    try:
        ctrls = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    out = []
    for ctrl in ctrls:
        try:
            out.append((ctrl, sorted(os.listdir(base / ctrl))))
        except OSError:  # gone meanwhile (unbound)
            continue
    return out


def namespaces(dev: PciDevice) -> list[BlockDevice]:
    """The whole-disk namespaces of every NVMe controller under this PCI function."""
    root = dev.root
    out: list[BlockDevice] = []
    base = dev.sys_path / "nvme"
    for ctrl, entries in controller_entries(dev):
        for name in entries:
            if _DISK_RE.match(name) and (base / ctrl / name / "dev").exists():
                out.append(BlockDevice(root, name, Path(os.path.realpath(base / ctrl / name))))
            elif m := _PATH_RE.match(name):
                head = f"nvme{m[1]}n{m[2]}"
                if root.sys("block", head).exists() and head not in {b.name for b in out}:
                    out.append(BlockDevice.by_name(root, head))
    return out


def controller_serial(dev: PciDevice) -> str | None:
    base = dev.sys_path / "nvme"
    try:
        for ctrl in sorted(os.listdir(base)):
            return (base / ctrl / "serial").read_text().strip()
    except FileNotFoundError:
        pass
    return None
