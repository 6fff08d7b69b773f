"""Does the host use a disk? Every reason, and what merely sits on it.

A namespace the host uses (mounted, swap, held by device-mapper/md, opened exclusively,
open by any process such as another VM's QEMU, or under / or /boot) must never be
unbound. A namespace that only carries the guest's own LVM/ZFS/md signatures, not active
on the host, is the normal case and passes.
"""

from __future__ import annotations

import errno
import re
from collections import namedtuple

from .block import BlockDevice
from .kernel import Kernel
from .openers import Openers
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


def holder_kind(dev: BlockDevice) -> str:
    """What a device stacked on a disk is, by its device-mapper uuid or name."""
    uuid = dev.dm_uuid or ""
    if re.match(r"^part\d+-", uuid):
        return "a partition mapping (kpartx)"
    if uuid.startswith("LVM-"):
        return "an active LVM volume"
    if uuid.startswith("CRYPT-"):
        return "an open LUKS mapping"
    if dev.dm_uuid is not None:
        return "a device-mapper device"
    if dev.name.startswith("md"):
        return "an md array"
    return "a stacked device"


def stack_use(dev: BlockDevice, all_mounts: list[Mount], active_swaps: set[str],
              names: tuple[str, ...] = (), ignore: frozenset[str] = frozenset()
              ) -> tuple[list[str], list[BlockDevice]]:
    """What the host does with `dev` and every device stacked on it, each as a predicate
    ("is mounted at /srv through dm-0 (vg-lv)", "is active swap", "is held by dm-0
    (vg-lv), an active LVM volume", "holds /: it is the host's own system disk"), and the
    stack. `names`: other /dev paths of `dev` (an LV's /dev/<vg>/<lv>, /dev/mapper/...);
    `ignore`: holders left out (see host_use). The one check of a disk (usage.host_use)
    and of an LVM volume (volumes) alike."""
    stack = [dev, *dev.holder_stack()]
    by_devnum = {d.devnum: d for d in stack if d.exists()}
    by_path = {f"/dev/{d.name}": d for d in stack}
    by_path.update({n: dev for n in names})

    def via(d: BlockDevice) -> str:
        return "" if d is dev else f" through {d.label()}"

    out: list[str] = []
    for m in all_mounts:
        on = by_devnum.get(m.devnum) or by_path.get(m.source)
        if on is None:
            continue
        if m.mountpoint in _HOST_CRITICAL:
            out.append(f"holds {m.mountpoint}{via(on)}: it is the host's own system disk")
        else:
            out.append(f"is mounted at {m.mountpoint}{via(on)}")
    swapping = []
    for path, d in by_path.items():
        if path in active_swaps and d not in swapping:
            swapping.append(d)
            out.append(f"is active swap{via(d)}")
    for h in dev.holders():
        if h.name not in ignore:
            out.append(f"is held by {h.label()}, {holder_kind(h)}")
    return out, stack


def loop_backings(root: Root) -> dict[str, str]:
    """loopN -> the block device it is backed by (kernel name), for every loop device
    over a block device: the loop driver holds its backing file in the kernel, no
    process's fd and no holders/ link shows it."""
    import os

    out = {}
    base = root.sys("block")
    try:
        names = [n for n in os.listdir(base) if n.startswith("loop")]
    except FileNotFoundError:
        return out
    for name in names:
        try:
            backing = (base / name / "loop" / "backing_file").read_text().strip()
        except OSError:  # not set up
            continue
        if backing.startswith("/dev/"):
            out[name] = os.path.basename(os.path.realpath(root.path / backing.lstrip("/")))
    return out


def host_use(root: Root, kernel: Kernel, disks: list[BlockDevice],
             openers: Openers | None = None, ignore: frozenset[str] = frozenset()) -> DiskUse:
    """`openers`: one run's scan of /proc, shared by every call of the run (the scan
    costs about as much as the rest of a pre-start on a busy node); None scans here.
    `ignore`: holders (dm-N, mdN) to leave out, those pre-start's safety net would
    deactivate (`pvehook check` only; the exclusive-open probe is then skipped)."""
    use = DiskUse()
    openers = openers if openers is not None else Openers(root)
    all_mounts = mounts(root)
    active_swaps = swaps(root)
    loops = loop_backings(root)
    for disk in disks:
        members = [disk, *disk.partitions()]
        for dev in members:
            uses, stack = stack_use(dev, all_mounts, active_swaps, ignore=ignore)
            use.reasons += [f"{dev.name} {u}" for u in uses]
            use.reasons += [f"{dev.name} backs the loop device {loop} (losetup -d /dev/{loop})"
                            for loop, backing in sorted(loops.items()) if backing == dev.name]
            _open_by(openers, dev, stack, use)
            props = dev.udev() or {}
            fs = props.get("ID_FS_TYPE")
            if fs in _SIGNATURES and not dev.holders():
                use.notes.append(f"{dev.name} carries {_SIGNATURES[fs]}"
                                 f"{' ' + repr(props['ID_FS_LABEL']) if props.get('ID_FS_LABEL') else ''}"
                                 ", not active on the host (the guest's own)")
        if openers.unreadable:
            use.notes.append(f"could not read the open files of {openers.unreadable}"
                             " process(es): run as root to see every opener")
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


def _open_by(openers: Openers, dev: BlockDevice, stack: list[BlockDevice], use: DiskUse) -> None:
    """Processes holding `dev` or a device stacked on it open (QEMU opens a disk given by
    path without O_EXCL: no other check sees it), and VM configs naming it by path."""
    running = set()
    for d in stack:
        num = d.devnum if d.exists() else None
        for pid in sorted(openers.pids(d.name, num)):
            p = openers.process(pid)
            via = "" if d is dev else f" through {d.label()}"
            if p.vmid is not None:
                running.add(p.vmid)
                use.reasons.append(f"{dev.name} is open{via} by {p.describe()}: stop VM"
                                   f" {p.vmid} or remove the disk from it first")
            else:
                use.reasons.append(f"{dev.name} is open{via} by {p.describe()}")
    num = dev.devnum if dev.exists() else None
    for c in openers.configs_naming(dev.name, num):
        if c.vmid in running:
            continue
        state = "running" if c.running else "not running"
        use.notes.append(f"warning: VM {c.vmid} ({state}) has {dev.name} by path in its config"
                         f" ({c.key}: {c.path}): started while this disk is passed through or"
                         " copied, it would open it on the host")
