"""Does the host use a disk? Every reason, and what merely sits on it.

A namespace the host uses (mounted, swap, held by device-mapper/md, opened exclusively,
or under / or /boot) must never be unbound. A namespace that only carries the guest's
own LVM/ZFS/md signatures, not active on the host, is the normal case and passes.
"""

from __future__ import annotations

import errno
import re
from collections import namedtuple

from .block import BlockDevice
from .kernel import Kernel
from .paths import Root

_HOST_CRITICAL = ("/", "/boot", "/boot/efi", "/usr", "/var")
_SIGNATURES = {
    "LVM2_member": "an LVM physical volume",
    "zfs_member": "a ZFS pool member",
    "linux_raid_member": "an md RAID member",
    "crypto_LUKS": "a LUKS volume",
}


class Mount(namedtuple("Mount", "devnum mountpoint source")):
    __slots__ = ()


class DiskUse:
    def __init__(self) -> None:
        self.reasons: list[str] = []  # the host uses it: refuse
        self.notes: list[str] = []  # found, harmless

    @property
    def in_use(self) -> bool:
        return bool(self.reasons)


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), s)


def mounts(root: Root) -> list[Mount]:
    out = []
    for line in root.proc("self", "mountinfo").read_text().splitlines():
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        out.append(Mount(fields[2], _unescape(fields[4]), _unescape(fields[sep + 2])))
    return out


def swaps(root: Root) -> set[str]:
    lines = root.proc("swaps").read_text().splitlines()[1:]
    return {_unescape(line.split()[0]) for line in lines if line.strip()}


def _holder_kind(dev: BlockDevice) -> str:
    uuid = dev.dm_uuid or ""
    if uuid.startswith("LVM-"):
        return "an active LVM volume"
    if uuid.startswith("CRYPT-"):
        return "an open LUKS mapping"
    if dev.dm_uuid is not None:
        return "a device-mapper device"
    if dev.name.startswith("md"):
        return "an md array"
    return "a stacked device"


def host_use(root: Root, kernel: Kernel, disks: list[BlockDevice],
             ignore: frozenset[str] = frozenset()) -> DiskUse:
    """`ignore`: holders (dm-N, mdN) to leave out, those pre-start's safety net would
    deactivate (`pvehook check` only; the exclusive-open probe is then skipped)."""
    use = DiskUse()
    all_mounts = mounts(root)
    active_swaps = swaps(root)
    for disk in disks:
        members = [disk, *disk.partitions()]
        for dev in members:
            stack = [dev, *dev.holder_stack()]
            stack_nums = {d.devnum: d for d in stack if d.exists()}
            for m in all_mounts:
                on = stack_nums.get(m.devnum) or next(
                    (d for d in stack if m.source == f"/dev/{d.name}"), None)
                if on is None:
                    continue
                via = "" if on is dev else f" through {on.label()}"
                if m.mountpoint in _HOST_CRITICAL:
                    use.reasons.append(
                        f"{dev.name} holds {m.mountpoint}{via}: it is the host's own system disk")
                else:
                    use.reasons.append(f"{dev.name} is mounted at {m.mountpoint}{via}")
            for d in stack:
                if f"/dev/{d.name}" in active_swaps:
                    via = "" if d is dev else f" through {d.label()}"
                    use.reasons.append(f"{dev.name} is active swap{via}")
            for h in dev.holders():
                if h.name in ignore:
                    continue
                use.reasons.append(f"{dev.name} is held by {h.label()}, {_holder_kind(h)}")
            props = dev.udev() or {}
            fs = props.get("ID_FS_TYPE")
            if fs in _SIGNATURES and not dev.holders():
                use.notes.append(f"{dev.name} carries {_SIGNATURES[fs]}"
                                 f"{' ' + repr(props['ID_FS_LABEL']) if props.get('ID_FS_LABEL') else ''}"
                                 ", not active on the host (the guest's own)")
        if not use.reasons and not any(h.name in ignore for d in members for h in d.holders()):
            # One probe on the whole namespace covers every exclusive user of it or of
            # its partitions, including those that leave no other trace (a ZFS pool).
            try:
                kernel.open_exclusive(disk.dev_path)
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                zfs = [d for d in members if (d.udev() or {}).get("ID_FS_TYPE") == "zfs_member"]
                if zfs:
                    pool = (zfs[0].udev() or {}).get("ID_FS_LABEL", "?")
                    use.reasons.append(f"{zfs[0].name} is part of the imported ZFS pool {pool!r}")
                else:
                    use.reasons.append(f"{disk.name} is opened exclusively by a process or driver")
    return use
