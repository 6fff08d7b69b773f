"""The hookscript: `<script> <vmid> <phase>`, as Proxmox VE runs it.

pre-start: check every NVMe controller of the VM, then bind exactly those addresses to
vfio-pci (all or none); a non-zero exit aborts the start. post-stop: give each recorded
device back to its driver and wait for its disks. Errors become exit codes only here.
"""

from __future__ import annotations

import sys

from .errors import PvehookError, Refusals, UsageError


PHASES_WITHOUT_WORK = ("post-start", "pre-stop")
USAGE = "usage: pvehook-hook <vmid> <phase>  (phase: pre-start, post-start, pre-stop, post-stop)"


def is_vmid(text: str) -> bool:
    """Proxmox's pve-vmid format (pve-common JSONSchema: ^[1-9][0-9]{2,8}$), ASCII only:
    str.isdigit() alone takes '²', and int() reads '١٢٣' as 123."""
    return text.isascii() and text.isdigit() and text[0] != "0" and 3 <= len(text) <= 9


def run(argv: list[str], ctx=None) -> int:
    """Run one phase; `ctx` (a pvehook.context.Context) is for tests."""
    if len(argv) != 2:
        print(f"pvehook: {USAGE}", file=sys.stderr)
        return UsageError.exit_code
    if not is_vmid(argv[0]):
        print(f"pvehook: malformed vmid {argv[0]!r}: Proxmox VM ids are 100 to 999999999,"
              f" ASCII digits only; {USAGE}", file=sys.stderr)
        return UsageError.exit_code
    vmid, phase = int(argv[0]), argv[1]
    if phase in PHASES_WITHOUT_WORK:
        return 0  # Proxmox runs these at every start and stop: import nothing more
    from . import phases, tasklog
    from .context import Context

    log = tasklog.log
    ctx = ctx or Context()
    log.setup(argv[0], phase, to_journal=ctx.root.dev("log").exists())
    try:
        if phase == "pre-start":
            phases.pre_start(ctx, vmid)
        elif phase == "post-stop":
            phases.post_stop(ctx, vmid)
        else:
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
