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
            check(ctx, plan)
            _report(plan)
            if plan.steps or plan.stays:
                from .assign import assign  # only now: moving devices needs rebind, lvm, waits

                assign(ctx, plan)
                from .pins import commit

                commit(ctx, plan)  # pins a drive seen for the first time, once the start succeeded
    else:
        _report(plan)


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
