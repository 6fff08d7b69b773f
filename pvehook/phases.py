"""The two phases with work: pre-start and post-stop (see hook.py for the entry)."""

from __future__ import annotations

from .context import Context
from .errors import GiveBackError, Refusals
from .tasklog import log


def pre_start(ctx: Context, vmid: int) -> None:
    from .journal import device_locks
    from .plan import check, choose, prepare

    plan = prepare(ctx, vmid)
    if not plan.refusals and plan.hostpci:
        # Mapping alternatives are chosen under the lock of every candidate, so a device
        # another start is taking is seen as taken and the next one is chosen. All the
        # locks are taken at once in one global order (device_locks sorts): no deadlock.
        with device_locks(ctx.root, plan.candidates, ctx.timeouts.lock):
            choose(ctx, plan)
            # What the safety net would deactivate is only left out of the check; nothing
            # is deactivated or listed until every check (the drive's pin, its group,
            # other holders and openers) has passed.
            gone = _guest_storage(ctx, plan, apply=False)
            check(ctx, plan, gone)
            if gone and not plan.refusals:
                _guest_storage(ctx, plan, apply=True)
                _verify_released(ctx, plan)
            _report(plan)
            if plan.steps or plan.stays:
                _list_guest(ctx, vmid, plan.managed)
                from .assign import assign  # only now: moving devices needs rebind, lvm, waits

                assign(ctx, plan)
                from .pins import commit

                commit(ctx, plan)  # pins a drive seen for the first time, once the start succeeded
    else:
        _report(plan)


def _guest_storage(ctx: Context, plan, apply: bool) -> frozenset[str]:
    """pre-start's safety net (pvehook.autoactivated): the holders (dm-N, mdN) of what the
    host activated on the VM's disks and nobody uses; deactivated with `apply`."""
    if not plan.managed or plan.refusals:
        return frozenset()
    from .autoactivated import release

    try:
        return frozenset(release(ctx.root, plan.managed, plan.lines, apply=apply))
    except OSError as e:  # lvm/mdadm failing: the host-use check refuses what stays active
        plan.lines.append(f"could not check the guest's storage the host activated: {e}")
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


def _report(plan) -> None:
    for line in plan.lines:
        log.info("%s", line)
    if plan.refusals:
        raise Refusals(plan.refusals)


def post_stop(ctx: Context, vmid: int) -> None:
    from .assign import give_back
    from .journal import device_locks

    journal = ctx.journal
    record = journal.load(vmid)
    if record is None:
        log.info("nothing recorded for VM %d: nothing to give back", vmid)
        return
    with device_locks(ctx.root, [d.address for d in record.devices], ctx.timeouts.lock):
        record = journal.load(vmid)  # again, under the locks
        if record is None:
            return
        errors = give_back(ctx, record, list(record.devices))
    if errors:
        raise GiveBackError("; ".join(errors))
