"""The two phases with work: pre-start and post-stop (see hook.py for the entry)."""

from __future__ import annotations

from .context import Context
from .errors import GiveBackError, Refusals
from .tasklog import log


def pre_start(ctx: Context, vmid: int) -> None:
    from .journal import device_locks
    from .plan import check, prepare

    plan, managed, passed = prepare(ctx, vmid)
    if not plan.refusals and managed:
        with device_locks(ctx.root, [str(d.address) for d in managed], ctx.timeouts.lock):
            _guest_storage(ctx, vmid, managed)
            check(ctx, plan, managed, passed)
            _report(plan)
            from .assign import assign  # only now: moving devices needs rebind, lvm, waits

            assign(ctx, plan)
    else:
        _report(plan)


def _guest_storage(ctx: Context, vmid: int, managed) -> None:
    """List the VM's controllers for the package's udev rule (from now on, the host
    leaves their LVM/md alone, also after a reboot), then deactivate what the host
    activated on them anyway and nobody uses (pvehook.autoactivated)."""
    from . import guestlist
    from .autoactivated import release

    try:
        guestlist.set_vm(ctx.root, guestlist.GUEST, vmid, {str(d.address) for d in managed})
    except OSError as e:
        log.warning("cannot list the VM's controllers in %s: %s; the host may activate"
                    " the guest's LVM/md after the next reboot", ctx.root.lib_dir, e)
    lines: list[str] = []
    try:
        release(ctx.root, managed, lines)
    except Exception as e:  # the host-use check still refuses what stays active
        log.warning("could not check the guest's storage the host activated: %s", e)
    for line in lines:
        log.info("%s", line)


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
