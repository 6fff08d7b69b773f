"""Apply a plan (pre-start) and give devices back (post-stop, and rollback).

The undo is recorded before every change; rollback lives in exactly one place
(`assign`'s except clause) and uses the same give-back as post-stop.
"""

from __future__ import annotations

from . import rebind
from .block import BlockDevice
from .context import Context
from .errors import BindError
from .iommu import VFIO
from .records import DeviceRecord, VmRecord
from .lvm import deactivate_guest_vgs
from .pci import PciAddress, PciDevice
from .plan import Plan
from .tasklog import log
from .waits import processes_holding, vfio_nodes, wait_exit, wait_namespaces


def assign(ctx: Context, plan: Plan, generation: str | None = None) -> None:
    """Bind every planned device to vfio-pci: all of them, or none. `generation` names
    this start in the record (restarts.py: a deferred release acts only on its own)."""
    # The undo, before the change: saved when the with block ends.
    with ctx.records.modify(plan.vmid, ctx.timeouts.lock) as record:
        if generation is not None:
            record.generation, record.kept_for_reboot = generation, None
        for step in (*plan.stays, *plan.steps):
            # An entry left from an earlier start of this VM keeps the driver it recorded.
            if record.find(str(step.device.address)) is None:
                record.devices.append(DeviceRecord(
                    str(step.device.address), step.original_driver, step.namespaces))
    # Only now out of the stale record it was in: a kill in between leaves it in both,
    # never in neither.
    for step in (*plan.stays, *plan.steps):
        if step.taken_from is not None:
            _forget(ctx, step.taken_from, str(step.device.address))
    if not plan.steps:
        return
    moving = [record.find(str(s.device.address)) for s in plan.steps]
    errors = rebind.Errors()
    try:
        if not ctx.root.sys("bus", "pci", "drivers", VFIO).is_dir():
            try:
                ctx.kernel.load_module("vfio-pci")
            except OSError as e:
                raise BindError(f"cannot load vfio-pci: {e}",
                                hint="check that the vfio-pci module is installed") from e
        errors = rebind.move(ctx.kernel, [(s.device, VFIO) for s in plan.steps],
                             ctx.timeouts.rebind)
        if errors:
            raise BindError("; ".join(errors.values()), hint=(
                f"the kernel is still busy with {', '.join(sorted(errors.stuck))}: it stays"
                f" in pvehook's record and goes back by itself later; once dmesg shows the"
                f" driver let go, `pvehook release {plan.vmid}` gives it back at once"
                if errors.stuck else
                "every device was given back; see the kernel log (dmesg)"))
    except BaseException:
        # A device with a write still in the kernel cannot be given back now.
        back = [rec for rec in moving if rec.address not in errors.stuck]
        log.error("rolling back: giving back %d device(s)", len(back))
        try:
            failed = give_back(ctx, record, back, wait_for_vfio=False)
        except Exception as e:  # log, do not hide the first error
            log.error("rollback failed: %s", e)
        else:
            for msg in failed:
                log.error("rollback: %s", msg)
        raise
    for step in plan.steps:
        log.info("%s %s -> vfio-pci", step.device.address, step.original_driver or "no driver")


def _forget(ctx: Context, vmid: int, address: str) -> None:
    with ctx.records.modify(vmid, ctx.timeouts.lock) as other:  # another VM's: under its lock
        other.devices = [d for d in other.devices if d.address != address]


def give_back(ctx: Context, record: VmRecord, devices: list[DeviceRecord],
              wait_for_vfio: bool = True) -> list[str]:
    """Return each device to the driver it came from; returns one message per failure.

    Devices given back (or with nothing to give back) leave the record; the others stay
    in it, so a second post-stop can try again.
    """
    errors: list[str] = []
    done: list[DeviceRecord] = []
    ready: list[tuple[PciDevice, DeviceRecord]] = []
    for rec in devices:
        dev = PciDevice(ctx.root, PciAddress.parse(rec.address))
        original = rec.original_driver
        if not dev.exists():
            errors.append(f"{rec.address} is no longer on the PCI bus")
            continue
        if original == VFIO:
            log.info("%s stays on vfio-pci (it was there before pre-start)", rec.address)
            done.append(rec)
            continue
        if dev.driver == original and dev.driver_override in (None, original):
            if dev.driver_override is not None:
                ctx.kernel.write(dev.sys_path / "driver_override", "\n")
            log.info("%s is on %s already", rec.address, original or "no driver")
            done.append(rec)
            continue
        if wait_for_vfio and dev.driver == VFIO:
            users = processes_holding(ctx.root, vfio_nodes(dev))
            left = wait_exit(users, ctx.timeouts.vfio_release) if users else []
            if left:
                errors.append(
                    f"{rec.address} is still open through VFIO by pid {', '.join(map(str, left))}"
                    f" after {ctx.timeouts.vfio_release:.0f} s; left on vfio-pci. Once that"
                    f" process is gone, run `pvehook release {record.vmid}`")
                continue
        ready.append((dev, rec))

    failed = rebind.move(ctx.kernel, [(dev, rec.original_driver) for dev, rec in ready],
                         ctx.timeouts.rebind, keep_override=False)
    for dev, rec in ready:
        addr = rec.address
        if addr in failed:
            errors.append(failed[addr])
            continue
        done.append(rec)
        back = f"{addr} vfio-pci -> {rec.original_driver or 'no driver'}"
        if rec.namespaces:
            try:
                disks = wait_namespaces(dev, rec.namespaces, ctx.timeouts.namespaces)
            except TimeoutError as e:
                errors.append(str(e))
                continue
            log.info("%s: %s", back, ", ".join(d.name for d in disks))
            _restore_lvm(ctx, addr, disks, errors)
        else:
            log.info("%s", back)
    gone = {d.address for d in done}
    record.devices = [d for d in record.devices if d.address not in gone]
    with ctx.records.modify(record.vmid, ctx.timeouts.lock) as current:
        current.devices = [d for d in current.devices if d.address not in gone]
    return errors


def _restore_lvm(ctx: Context, addr: str, disks: list[BlockDevice], errors: list[str]) -> None:
    try:
        vgs = deactivate_guest_vgs(ctx.root, disks)
    except OSError as e:  # lvm missing, failing, or printing what we cannot read
        errors.append(f"{addr}: could not check the guest's LVM volume groups: {e}")
        return
    if vgs:
        log.info("%s: deactivated volume group(s) %s that the host had auto-activated"
                 " (the guest's own)", addr, ", ".join(vgs))
    _warn_name_clash(ctx, addr, disks)


def _warn_name_clash(ctx: Context, addr: str, disks: list[BlockDevice]) -> None:
    from .lvm import name_clashes

    try:
        clashes = name_clashes(disks)
    except Exception as e:
        log.warning("%s: could not compare the guest's volume group names with the host's: %s",
                    addr, e)
        return
    for name, others in clashes:
        log.warning("%s: the guest's volume group %r has the name of the host's volume group on"
                    " %s: while this disk is on the host, LVM commands that name %r refuse"
                    " (\"Multiple VGs found with the same name\"), Proxmox's storage on it"
                    " included; `pvehook reserve <vmid>` keeps the disk on vfio-pci between"
                    " runs", addr, name, ", ".join(others), name)
