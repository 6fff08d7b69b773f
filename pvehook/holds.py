"""Which running VM holds a PCI device: qemu-server's reservations and our own records.

qemu-server keeps /run/qemu-server/pci-id-reservations (PVE/QemuServer/PCI.pm), one line
per function, `<id> <vmid> pid:<pid>` for a running VM or `<id> <vmid> time:<epoch>` for
the window before its QEMU runs; a pid that is gone or a time that passed is stale.
"""

from __future__ import annotations

import re
import time

from .records import Records, VmRecord, boot_id, boottime
from .paths import Root
from .pci import PciAddress, PciSelector

# Our own record of another VM counts as a hold this long even when that VM has no QEMU
# process yet: it covers the step from its pre-start to qemu-server's reservation.
# Measured on CLOCK_BOOTTIME within one boot: an NTP step of the wall clock moves neither end.
RECORD_GRACE_S = 120.0

_RES_RE = re.compile(r"^(\S+)\s(\d+)\s(time|pid):(\d+)$")


def pid_alive(root: Root, pid: int) -> bool:
    return root.proc(str(pid)).is_dir()


def vm_running(root: Root, vmid: int) -> bool:
    try:
        pid = int(root.run("qemu-server", f"{vmid}.pid").read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return False
    return pid_alive(root, pid)


def reservations(root: Root) -> dict[PciAddress, int]:
    """Live qemu-server reservations: PCI function -> vmid."""
    out: dict[PciAddress, int] = {}
    try:
        text = root.run("qemu-server", "pci-id-reservations").read_text()
    except FileNotFoundError:
        return out
    now = time.time()
    for line in text.splitlines():
        m = _RES_RE.match(line.strip())
        if not m:
            continue
        live = pid_alive(root, int(m[4])) if m[3] == "pid" else int(m[4]) > now
        if not live:
            continue
        try:
            sel = PciSelector.parse(m[1])
        except ValueError:
            continue
        if sel.function is not None:
            out[PciAddress(sel.domain, sel.bus, sel.slot, sel.function)] = int(m[2])
    return out


class Holds:
    """Answers "is this device held by a VM other than `vmid`?" for one hook run.

    A record counts as a whole: while its VM runs, or within the grace period after the
    pre-start that wrote it, every device it names is held; after that it is stale, every
    device of it (on vfio-pci or not) can be taken and leaves it. A record that cannot be
    read holds every address its text names, and nothing else.
    """

    def __init__(self, root: Root, store: Records, vmid: int):
        self.root = root
        self.vmid = vmid
        self.reserved = reservations(root)
        records, corrupt = store.scan()
        self.records = [r for r in records if r.vmid != vmid]
        self.corrupt = [e for e in corrupt if e.vmid != vmid]
        self._boot = boot_id(root)
        self._now = boottime()

    @property
    def notes(self) -> list[str]:
        """One line per record that cannot be read, naming its file."""
        return [f"warning: {e}" for e in self.corrupt]

    def live(self, rec: VmRecord) -> bool:
        if vm_running(self.root, rec.vmid):
            return True
        if rec.kept_for_reboot is not None and rec.boot_id == self._boot:
            # Kept on vfio-pci for the VM's `qm reboot`: its until the restart's post-stop
            # or the deferred release (restarts.py) gives it back, however long that is.
            return True
        # (No boot id readable on either side: taken as the same boot, the safe side.)
        return rec.boot_id == self._boot and 0 <= self._now - rec.boottime < RECORD_GRACE_S

    def holder(self, address: PciAddress) -> str | None:
        other = self.reserved.get(address)
        if other is not None and other != self.vmid:
            return f"VM {other} (qemu-server's PCI reservation)"
        for rec in self.records:
            if rec.find(str(address)) and self.live(rec):
                return f"VM {rec.vmid} (pvehook's record in {self.root.state_dir})"
        for err in self.corrupt:
            if str(address) in err.addresses:
                return (f"VM {err.vmid}, going by {err.path}, a record pvehook cannot read;"
                        f" check VM {err.vmid} and remove that file once it is stopped")
        return None

    def stale_record(self, address: PciAddress):
        """A record of a VM that no longer runs, naming this device: (record, entry)."""
        if self.holder(address) is not None:
            return None
        for rec in self.records:
            dev = rec.find(str(address))
            if dev:
                return rec, dev
        return None

    def is_taken(self, address: PciAddress) -> bool:
        return self.holder(address) is not None
