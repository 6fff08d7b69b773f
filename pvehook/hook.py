"""The hookscript: `<script> <vmid> <phase>`, as Proxmox VE runs it.

pre-start: check every NVMe controller of the VM, then bind exactly those addresses to
vfio-pci (all or none); a non-zero exit aborts the start. post-stop: give each recorded
device back to its driver and wait for its disks. Errors become exit codes only here.
"""

from __future__ import annotations

import logging
import sys

from .context import Context
from .errors import GiveBackError, PvehookError, Refusals, UsageError

log = logging.getLogger("pvehook")

PHASES_WITHOUT_WORK = ("post-start", "pre-stop")
USAGE = "usage: pvehook-hook <vmid> <phase>  (phase: pre-start, post-start, pre-stop, post-stop)"


class _SyslogHandler(logging.Handler):
    """The same lines to the journal, tagged with vmid and phase (the C syslog module
    costs nothing to import, unlike logging.handlers)."""

    def __init__(self, ident: str):
        super().__init__()
        import syslog

        self._syslog = syslog
        syslog.openlog(ident, 0, syslog.LOG_DAEMON)

    def emit(self, record: logging.LogRecord) -> None:
        prio = self._syslog.LOG_ERR if record.levelno >= logging.ERROR else (
            self._syslog.LOG_WARNING if record.levelno >= logging.WARNING else self._syslog.LOG_INFO)
        self._syslog.syslog(prio, self.format(record))


class _TaskLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"pvehook: error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"pvehook: warning: {msg}"
        return f"pvehook: {msg}"


def setup_logging(vmid: str, phase: str, to_journal: bool) -> None:
    # stdout is the Proxmox task log (or the journal, for post-stop run by qmeventd).
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(_TaskLogFormatter())
    handlers: list[logging.Handler] = [out]
    if to_journal:
        j = _SyslogHandler(f"pvehook[{vmid} {phase}]")
        j.setFormatter(logging.Formatter("%(message)s"))
        handlers.append(j)
    log.handlers[:] = handlers
    log.setLevel(logging.INFO)
    log.propagate = False


def pre_start(ctx: Context, vmid: int) -> None:
    from .assign import assign
    from .journal import device_locks
    from .plan import check, prepare

    plan, managed, passed = prepare(ctx, vmid)
    if not plan.refusals and managed:
        with device_locks(ctx.root, [str(d.address) for d in managed], ctx.timeouts.lock):
            check(ctx, plan, managed, passed)
            _report(plan)
            assign(ctx, plan)
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


def run(argv: list[str], ctx: Context | None = None) -> int:
    if len(argv) != 2 or not argv[0].isdigit():
        print(f"pvehook: {USAGE}", file=sys.stderr)
        return UsageError.exit_code
    vmid, phase = int(argv[0]), argv[1]
    ctx = ctx or Context()
    setup_logging(argv[0], phase, to_journal=ctx.root.dev("log").exists())
    try:
        if phase == "pre-start":
            pre_start(ctx, vmid)
        elif phase == "post-stop":
            post_stop(ctx, vmid)
        elif phase not in PHASES_WITHOUT_WORK:
            log.warning("unknown phase %r: nothing to do", phase)
    except PvehookError as e:
        for err in e.errors if isinstance(e, Refusals) else [e]:
            log.error("%s", err)
        if phase == "pre-start":
            log.error("VM %d not started", vmid)
        return e.exit_code
    except Exception as e:  # a bug: still a clear line, and non-zero so the start aborts
        log.exception("unexpected error in %s of VM %d: %s", phase, vmid, e)
        return 1
    return 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))
