"""Which NVMe controllers hold a guest's storage: the lists the node reads at boot.

Two directories under /var/lib/pvehook (node-local, they survive reboots), one empty-ish
file per PCI address, named by the address, holding the vmids that pass it:

- `guest/<address>`: a controller a VM of this node passes. The package's udev rule
  (61-pvehook-guest.rules) tests this path for every block device below the address and
  hides the disk's LVM/md signature from lvm2's and mdadm's rules (69-lvm.rules,
  64-md-raid-assembly.rules): the host never autoactivates or assembles the guest's
  storage, at boot, at give-back, on a rescan.
- `reserved/<address>`: `pvehook reserve`d. At boot the address goes to vfio-pci before
  nvme binds it (modprobe.d `install nvme` runs /usr/libexec/pvehook/reserve-vfio
  first; a udev rule does it for a device added later).

A file per address, because udev's TEST key can ask "does /var/lib/pvehook/guest/%b exist"
without running a program for every block device. Files are written atomically, 0600,
in 0700 directories.
"""

from __future__ import annotations

import os
from pathlib import Path

from .paths import Root

GUEST = "guest"
RESERVED = "reserved"


def _dir(root: Root, kind: str) -> Path:
    return root.lib_dir / kind


def read(root: Root, kind: str) -> dict[str, set[int]]:
    """address -> vmids, for `kind` GUEST or RESERVED."""
    d = _dir(root, kind)
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return {}
    out: dict[str, set[int]] = {}
    for name in names:
        if name.startswith("."):
            continue
        try:
            fd = os.open(d / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        with os.fdopen(fd) as f:
            out[name] = {int(w) for w in f.read().split() if w.isdigit()}
    return out


def _write(root: Root, kind: str, address: str, vmids: set[int]) -> None:
    d = _dir(root, kind)
    for p in (root.lib_dir, d):
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(p, 0o700)
    path = d / address
    if not vmids:
        path.unlink(missing_ok=True)
        return
    tmp = d / f".{address}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{v}\n" for v in sorted(vmids)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def set_vm(root: Root, kind: str, vmid: int, addresses: set[str]) -> bool:
    """Make `addresses` exactly the ones listed for `vmid`; True when a file changed.

    Reads first and writes only what differs: pre-start calls this at every start.
    """
    current = read(root, kind)
    changed = False
    for addr in sorted(set(current) | set(addresses)):
        vmids = set(current.get(addr, set()))
        want = vmids | {vmid} if addr in addresses else vmids - {vmid}
        if want != vmids:
            _write(root, kind, addr, want)
            changed = True
    return changed


def addresses_of(root: Root, kind: str, vmid: int) -> set[str]:
    return {a for a, vmids in read(root, kind).items() if vmid in vmids}
