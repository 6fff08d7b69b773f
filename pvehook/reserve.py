"""`pvehook reserve` / `unreserve`: a VM's NVMe controllers stay on vfio-pci, from boot on.

A reserved address is listed in /var/lib/pvehook/reserved (pvehook.guestlist). At boot the
package's modprobe.d file runs /usr/libexec/pvehook/reserve-vfio before nvme is loaded
(also in the initramfs), which sets the address's driver_override to vfio-pci, so the
host's nvme driver never binds it and the host never sees the guest's disks. Between runs
the controller stays there: pre-start finds it on vfio-pci and records vfio-pci as its
driver, so post-stop leaves it.

reserve moves the VM's controllers now, after the checks pre-start makes (IOMMU group,
host use, other VMs); unreserve gives them back to nvme when the VM is stopped, or
leaves that to the VM's post-stop when it runs.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from . import guestlist, rebind
from .context import Context
from .errors import BindError, ConfigError, PvehookError, Refusals
from .holds import Holds, vm_running
from .iommu import VFIO
from .records import device_locks
from .pci import PciAddress, PciDevice
from .plan import Plan, choose, prepare

NVME = "nvme"


def _vm_plan(ctx: Context, vmid: int) -> Plan:
    """pre-start's plan of the VM's devices (no LVM volumes), before the mapping choice."""
    plan = prepare(ctx, vmid, volumes=False)
    if plan.refusals:
        raise Refusals(plan.refusals)
    if not plan.candidates:
        raise ConfigError(f"VM {vmid} passes no NVMe controller (hostpci) on this node:"
                          " nothing to reserve", hint="see `pvehook list`")
    return plan


def _record_driver(ctx: Context, vmid: int, addresses: set[str], driver: str) -> bool:
    """While the VM runs, its post-stop gives each device back to the driver in its
    record: make that `driver`. True when the VM has a record."""
    records = ctx.records
    record = records.load(vmid)
    if record is None:
        return False
    for dev in record.devices:
        if dev.address in addresses:
            dev.original_driver = driver
    records.save(record)
    return True


def _record_identities(ctx: Context, managed: list[PciDevice]) -> None:
    """Record each drive's identity while nvme still shows it: from now on it stays on
    vfio-pci, and pre-start's pin check reads it from this record (pvehook.pins)."""
    from .pins import PinStore, boot_id, observe, record_seen

    boot = boot_id(ctx.root)
    with PinStore(ctx.root).update() as data:
        record_seen(data, ctx.root, [observe(ctx.root, d, data, boot) for d in managed])


def nvme_builtin(ctx: Context) -> bool:
    """modules.builtin of the running kernel names nvme (CONFIG_BLK_DEV_NVME=y)."""
    import os

    path = ctx.root.path / "usr/lib/modules" / os.uname().release / "modules.builtin"
    try:
        return any(line.rstrip().endswith("/nvme.ko") for line in path.read_text().splitlines())
    except OSError:
        return False


def update_initramfs(ctx: Context, say) -> None:
    """The initramfs carries the lists (initramfs-tools hook `pvehook`): refresh it."""
    if ctx.root.path != Path("/") or shutil.which("update-initramfs") is None:
        return
    say("updating the initramfs (update-initramfs -u), it carries the list of reserved"
        " controllers")
    proc = subprocess.run(["update-initramfs", "-u"], capture_output=True, text=True)
    if proc.returncode != 0:
        say(f"warning: update-initramfs -u failed ({proc.stderr.strip() or proc.returncode});"
            " run it again before the next reboot")


def reserve(ctx: Context, vmid: int, say=print) -> list[str]:
    """Reserve the VM's NVMe controllers and move them to vfio-pci now. Returns the
    addresses. Raises the same refusals as pre-start (exit codes 10, 11, 12, 13)."""
    from .phases import _list_guest, check_and_release

    plan = _vm_plan(ctx, vmid)
    with device_locks(ctx.root, plan.candidates, ctx.timeouts.lock):
        choose(ctx, plan)  # as pre-start: the same checks, the same safety net
        check_and_release(ctx, plan)
        for line in plan.lines:
            say(line)
        if plan.refusals:
            raise Refusals(plan.refusals)
        addresses = {str(d.address) for d in plan.managed}
        _record_identities(ctx, plan.managed)
        _list_guest(ctx, vmid, plan.managed)
        # The list first: from now on a reboot, a rescan or nvme loading puts them on
        # vfio-pci too; undone below if the move fails.
        guestlist.set_vm(ctx.root, guestlist.RESERVED, vmid, addresses)
        if plan.steps:
            if not ctx.root.sys("bus", "pci", "drivers", VFIO).is_dir():
                ctx.kernel.load_module("vfio-pci")
            errors = rebind.move(ctx.kernel, [(s.device, VFIO) for s in plan.steps],
                                 ctx.timeouts.rebind)
            if errors:
                guestlist.set_vm(ctx.root, guestlist.RESERVED, vmid, set())
                back = [(s.device, s.original_driver) for s in plan.steps
                        if str(s.device.address) not in errors.stuck]
                rebind.move(ctx.kernel, back, ctx.timeouts.rebind, keep_override=False)
                raise BindError("; ".join(errors.values()),
                                hint="nothing was reserved; see the kernel log (dmesg)")
            for s in plan.steps:
                say(f"{s.device.address} {s.original_driver or 'no driver'} -> vfio-pci")
        if _record_driver(ctx, vmid, addresses, VFIO):
            say(f"VM {vmid} runs: its post-stop leaves {', '.join(sorted(addresses))} on vfio-pci")
    for a in sorted(addresses):
        say(f"{a} reserved for VM {vmid}: on vfio-pci from boot on, the host does not see its disks")
    if nvme_builtin(ctx):
        say("note: this kernel has nvme built in: at boot nvme binds the controller before any"
            " user space runs; udev's rule moves it to vfio-pci right after (its disks are seen"
            " for that moment, nothing on them is activated)")
    update_initramfs(ctx, say)
    return sorted(addresses)


def unreserve(ctx: Context, vmid: int, say=print) -> list[str]:
    """Forget the VM's reservation; give its controllers back to nvme if it is stopped."""
    addresses = guestlist.addresses_of(ctx.root, guestlist.RESERVED, vmid)
    if not addresses:
        say(f"VM {vmid} has nothing reserved")
        return []
    with device_locks(ctx.root, sorted(addresses), ctx.timeouts.lock):
        guestlist.set_vm(ctx.root, guestlist.RESERVED, vmid, set())
        if vm_running(ctx.root, vmid):
            _record_driver(ctx, vmid, addresses, NVME)
            say(f"VM {vmid} runs: its post-stop gives {', '.join(sorted(addresses))} back to nvme")
        else:
            holds = Holds(ctx.root, ctx.records, vmid)
            moves = []
            for a in sorted(addresses):
                dev = PciDevice(ctx.root, PciAddress.parse(a))
                holder = holds.holder(dev.address)
                if not dev.exists():
                    say(f"{a} is not on the PCI bus: nothing to give back")
                elif holder:
                    say(f"{a} is held by {holder}: left on vfio-pci")
                elif dev.driver == VFIO or dev.driver_override == VFIO:
                    moves.append(dev)
            if moves:
                errors = rebind.move(ctx.kernel, [(d, NVME) for d in moves], ctx.timeouts.rebind,
                                     keep_override=False)
                for d in moves:
                    a = str(d.address)
                    say(errors[a] if a in errors else f"{a} vfio-pci -> nvme")
                if errors:
                    update_initramfs(ctx, say)
                    raise BindError("; ".join(errors.values()),
                                    hint="no longer reserved; once dmesg shows the driver let go,"
                                         f" run `pvehook unreserve {vmid}` again")
    update_initramfs(ctx, say)
    return sorted(addresses)


def list_guest_controllers(ctx: Context, vmids: list[int]) -> None:
    """At `pvehook register`: list the NVMe controllers of these VMs of this node for the
    udev rule, so the host leaves their LVM/md alone from the next boot on, before the
    VM's first start (pre-start lists them too). Best effort: a VM of another node, a
    config that does not resolve, are left to pre-start."""
    for vmid in vmids:
        try:
            # Every controller any mapping alternative may give the VM.
            plan = prepare(ctx, vmid, volumes=False)
            guestlist.set_vm(ctx.root, guestlist.GUEST, vmid, set(plan.candidates))
        except (OSError, PvehookError):
            continue


def reserved_by_vm(ctx: Context) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for addr, vmids in guestlist.read(ctx.root, guestlist.RESERVED).items():
        for v in vmids:
            out.setdefault(v, []).append(addr)
    return {v: sorted(a) for v, a in sorted(out.items())}

