"""The two phases with work: pre-start and post-stop (see hook.py for the entry)."""

from __future__ import annotations

from .context import Context
from .errors import GiveBackError, Refusals
from .tasklog import log


def pre_start(ctx: Context, vmid: int) -> None:
    from .records import device_locks
    from .plan import choose, prepare

    plan = prepare(ctx, vmid)
    if not plan.refusals:
        _give_back_unpassed(ctx, vmid, set(plan.candidates))
    if not plan.refusals and plan.hostpci:
        from .restarts import needs_release, new_generation, schedule_release

        generation = new_generation()
        # Mapping alternatives are chosen under the lock of every candidate, so a device
        # another start is taking is seen as taken and the next one is chosen. All the
        # locks are taken at once in one global order (device_locks sorts): no deadlock.
        with device_locks(ctx.root, plan.candidates, ctx.timeouts.lock):
            choose(ctx, plan)
            check_and_release(ctx, plan)
            _report(plan)
            if plan.steps or plan.stays:
                _list_guest(ctx, vmid, plan.managed)
                from .assign import assign  # only now: moving devices needs rebind, lvm, waits

                before = ctx.records.load(vmid)
                try:
                    assign(ctx, plan, generation)
                finally:
                    # qemu-server runs no post-stop when the start fails from here on; and
                    # a device the kernel was still busy with at a rollback stays recorded.
                    record = ctx.records.load(vmid)
                    if record is not None and record.generation == generation \
                            and needs_release(record):
                        schedule_release(ctx, vmid, generation, "if this start fails")
                from .pins import commit

                commit(ctx, plan)  # pins a drive seen for the first time, once the start succeeded
                if before is not None and before.kept_for_reboot is not None:
                    for dev in before.devices:
                        if record is not None and record.find(dev.address):
                            log.info("%s: on vfio-pci since the reboot of VM %d; goes back to %s"
                                     " when it stops", dev.address, vmid,
                                     dev.original_driver or "no driver")
    else:
        _report(plan)


def check_and_release(ctx: Context, plan) -> None:
    """plan.check with pre-start's safety net: what it would deactivate is only left out
    of the check; nothing is deactivated until every check (the drive's pin, its group,
    other holders and openers) has passed, and the disks are read again after."""
    from .plan import check

    preview: list[str] = []
    gone = _guest_storage(ctx, plan, preview, apply=False)
    check(ctx, plan, gone)
    if gone and not plan.refusals:
        _guest_storage(ctx, plan, plan.lines, apply=True)
        _verify_released(ctx, plan)
    else:
        plan.lines += preview  # what it found, and why it left it


def _guest_storage(ctx: Context, plan, lines: list[str], apply: bool) -> frozenset[str]:
    """pre-start's safety net (pvehook.autoactivated): the holders (dm-N, mdN) of what the
    host activated on the VM's disks and nobody uses, a line each in `lines`;
    deactivated with `apply`."""
    if not plan.managed or plan.refusals:
        return frozenset()
    from .autoactivated import release

    try:
        return frozenset(release(ctx.root, plan.managed, lines, apply=apply))
    except OSError as e:  # lvm/mdadm failing: the host-use check refuses what stays active
        lines.append(f"could not check the guest's storage the host activated: {e}")
        return frozenset()


def _verify_released(ctx: Context, plan) -> None:
    """After deactivating, read the disks again: what still holds them refuses the start."""
    from .block import namespaces
    from .errors import InUseError
    from .usage import host_use

    for dev in plan.managed:
        disks = namespaces(dev)
        use = host_use(ctx.root, ctx.kernel, disks) if disks else None
        if use is not None and use.in_use:
            plan.refusals.append(InUseError(
                f"{dev.address}: the host still uses this disk after deactivating the guest's"
                f" storage: " + "; ".join(use.reasons),
                hint="stop using it on the host (umount, swapoff, vgchange -an, mdadm --stop)"))


def _list_guest(ctx: Context, vmid: int, managed) -> None:
    """List the VM's controllers for the package's udev rule: from now on the host leaves
    their LVM/md alone, also after a reboot (pvehook.guestlist)."""
    from . import guestlist

    try:
        guestlist.set_vm(ctx.root, guestlist.GUEST, vmid, {str(d.address) for d in managed})
    except OSError as e:
        log.warning("cannot list the VM's controllers in %s: %s; the host may activate"
                    " the guest's LVM/md after the next reboot", ctx.root.lib_dir, e)


def _give_back_unpassed(ctx: Context, vmid: int, passed_now: set[str]) -> None:
    """Devices still in this VM's record (kept for its reboot) that its config no longer
    passes (a change applied at the restart): back to the host now."""
    record = ctx.records.load(vmid)
    gone = [d.address for d in record.devices if d.address not in passed_now] if record else []
    if not gone:
        return
    from .assign import give_back
    from .records import device_locks

    with device_locks(ctx.root, gone, ctx.timeouts.lock):
        record = ctx.records.load(vmid)  # again, under the locks
        devices = [d for d in record.devices if d.address in gone] if record else []
        for dev in devices:
            log.info("%s: VM %d does not pass it any more: giving it back", dev.address, vmid)
        errors = give_back(ctx, record, devices) if devices else []
    for err in errors:  # the start itself does not need these devices
        log.warning("%s", err)


def _report(plan) -> None:
    for line in plan.lines:
        log.info("%s", line)
    if plan.refusals:
        raise Refusals(plan.refusals)


def post_stop(ctx: Context, vmid: int) -> None:
    from .assign import give_back
    from .records import device_locks
    from .restarts import reboot_requested

    records = ctx.records
    record = records.load(vmid)
    if record is None:
        log.info("nothing recorded for VM %d: nothing to give back", vmid)
        return
    with device_locks(ctx.root, [d.address for d in record.devices], ctx.timeouts.lock):
        record = records.load(vmid)  # again, under the locks
        if record is None:
            return
        if reboot_requested(ctx.root, vmid) and _keep_for_reboot(ctx, record):
            return
        errors = give_back(ctx, record, list(record.devices))
    if errors:
        raise GiveBackError("; ".join(errors))


def _keep_for_reboot(ctx: Context, record) -> bool:
    """`qm reboot`: leave the devices on vfio-pci for the start that follows, with a
    deferred release in case it never comes. False: give them back now."""
    import time

    from .restarts import needs_release, new_generation, schedule_release

    if not needs_release(record):
        return False
    record.generation = record.generation or new_generation()
    record.kept_for_reboot = time.time()
    ctx.records.save(record)
    if not schedule_release(ctx, record.vmid, record.generation, "kept for the reboot"):
        log.warning("VM %d: giving its devices back now instead", record.vmid)
        return False
    for dev in record.devices:
        log.info("%s stays on vfio-pci for the reboot of VM %d (recorded: goes back to %s"
                 " when it stops)", dev.address, record.vmid, dev.original_driver or "no driver")
    return True
