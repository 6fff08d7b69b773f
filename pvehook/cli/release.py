"""`pvehook release`: give a stopped VM's devices back to the host (also the job that
pre-start and a reboot's post-stop schedule, see pvehook.later)."""

from __future__ import annotations

import click

from .. import exitcodes as codes
from ..errors import PvehookError
from .configs import context
from .entry import VMID, cli, vmid_completion


@cli.command(epilog="""\b
Examples:
  pvehook release 100
  pvehook status 100                 where its devices are now

\b
""" + codes.summary([
    (codes.OK, "done, or nothing was recorded"),
    (codes.GIVE_BACK, "a device could not be given back (each one is reported)"),
    (codes.VM_BUSY, "the VM is running, or a Proxmox task holds its lock")]))
@click.argument("vmid", type=VMID, shell_complete=vmid_completion)
@click.option("--deferred", metavar="GENERATION", hidden=True,
              help="The job pre-start and a reboot's post-stop schedule: give back only if"
                   " the VM is not running and no newer start took over; else do nothing.")
@click.pass_context
def release(cctx, vmid, deferred):
    """Give the devices of a stopped VM back to the host.

    What the hook's post-stop does, for a VM whose post-stop did not give everything
    back (a device still busy, a VM killed outside Proxmox). Each device goes back to
    the driver it came from. Refused while the VM runs or while a Proxmox task (a start,
    stop or cleanup) holds the VM's lock.
    """
    from ..release import deferred_release
    from ..release import release as do_release
    from ..tasklog import log

    ctx = context()
    log.setup(str(vmid), "release", to_journal=ctx.root.dev("log").exists())
    if deferred is None:
        do_release(ctx, vmid)
        cctx.exit(0)
    try:
        deferred_release(ctx, vmid, deferred)
    except PvehookError as e:  # nobody reads this job's stderr: say it in the journal
        log.error("%s", e)
        raise
    cctx.exit(0)
