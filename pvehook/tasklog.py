"""Where the hook's lines go: the Proxmox task log (stdout) and the journal (syslog).

post-stop run by qmeventd has no task: its stdout goes to the journal already.
Not the logging module: it costs more to import (~14 ms) than the rest of a hook run
needs, and the hook only ever writes whole lines to these two places.
"""

from __future__ import annotations

import sys

_PREFIX = {"info": "pvehook: ", "warning": "pvehook: warning: ", "error": "pvehook: error: "}


class TaskLog:
    def __init__(self) -> None:
        self._syslog = None  # the syslog module once setup() opened it

    def setup(self, vmid: str, phase: str, to_journal: bool) -> None:
        """Tag the journal's copy with vmid and phase; without /dev/log, stdout only."""
        if to_journal:
            import syslog  # a C module: nothing to import behind it

            syslog.openlog(f"pvehook[{vmid} {phase}]", 0, syslog.LOG_DAEMON)
            self._syslog = syslog

    def _line(self, level: str, msg: str, args: tuple) -> None:
        text = msg % args if args else msg
        # sys.stdout looked up per line: the task log is whatever stdout is now.
        print(_PREFIX[level] + text, file=sys.stdout, flush=True)
        if self._syslog is not None:
            prio = {"info": self._syslog.LOG_INFO, "warning": self._syslog.LOG_WARNING,
                    "error": self._syslog.LOG_ERR}[level]
            self._syslog.syslog(prio, text)

    def info(self, msg: str, *args) -> None:
        self._line("info", msg, args)

    def warning(self, msg: str, *args) -> None:
        self._line("warning", msg, args)

    def error(self, msg: str, *args) -> None:
        self._line("error", msg, args)

    def exception(self, msg: str, *args) -> None:
        """An error line, then the traceback of the exception being handled (a bug)."""
        import traceback

        self.error(msg, *args)
        for line in traceback.format_exc().rstrip().splitlines():
            self._line("error", "%s", (line,))


log = TaskLog()
