"""Where the hook's lines go: the Proxmox task log (stdout) and the journal.

post-stop run by qmeventd has no task: its stdout goes to the journal already.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("pvehook")


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


def setup(vmid: str, phase: str, to_journal: bool) -> None:
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
