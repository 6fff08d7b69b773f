"""`pvehook pin`: show, accept or forget the drives pinned for a VM of this node."""

from __future__ import annotations

import os

import click

from ..errors import NotRootError, UsageError
from .configs import context
from .entry import VMID, cli, emit_json, json_option, vmid_completion


@cli.command(epilog="""\b
Examples:
  pvehook pin 100                 which drives VM 100 is pinned to, and where they are
  pvehook pin 100 --accept        the drives at VM 100's addresses now become its drives
  pvehook pin 100 --forget        drop the pins; the next start pins again
\b
Pins are node-local (/var/lib/pvehook/pins.json): PCI addresses and drives belong to
one node. A VM is pinned at `pvehook register` and, without a pin, at its first start.""")
@click.argument("vmid", type=VMID, shell_complete=vmid_completion)
@click.option("--accept", is_flag=True, help="Pin the drives now at the VM's addresses"
              " (after a drive swap or a renumbering you meant).")
@click.option("--forget", is_flag=True, help="Drop the VM's pins; its next start pins the"
              " drives there then.")
@json_option
@click.pass_context
def pin(cctx, vmid, accept, forget, as_json):
    """Show, accept or forget the drives pinned for a VM of this node.

    pre-start refuses (exit 18) when a VM's address holds another drive than the one
    pinned for it: after a BIOS update, a new card or a moved drive, the same hostpci
    line names another slot's drive.
    """
    from .. import pins

    if accept and forget:
        raise UsageError("--accept and --forget exclude each other")
    ctx = context()
    if accept or forget:
        if os.geteuid() != 0:
            raise NotRootError("pvehook pin --accept/--forget writes /var/lib/pvehook/pins.json",
                               hint="run it as root")
        done = pins.accept(ctx, vmid) if accept else pins.forget(ctx, vmid)
        if as_json:
            emit_json({"vmid": vmid, "action": "accepted" if accept else "forgotten",
                        "pins": done})
            cctx.exit(0)
        for d in done:
            if accept:
                was = f" (was {', '.join(d['was'])})" if d["was"] and d["was"] != [d["description"]] else ""
                click.echo(f"VM {vmid} {d['key']}: pinned {d['description']} at {d['address']}{was}")
                if d["also_pinned_for"]:
                    click.echo(f"  note: it is also the pinned drive of {', '.join(d['also_pinned_for'])}:"
                               " never start both at once")
            else:
                click.echo(f"VM {vmid} {d['key']}: forgot {d['description']} (pinned at {d['address']})")
        if not done:
            click.echo(f"VM {vmid}: {'no NVMe drive to pin' if accept else 'no pins'}")
        cctx.exit(0)
    info = pins.inspect_vm(ctx, vmid)
    if as_json:
        emit_json(info)
        cctx.exit(0)
    click.echo(f"VM {vmid}: pins in {info['store']} (this node only)")
    for d in info["drives"]:
        how = f" ({d['how']})" if d["how"] else ""
        verdict = {"ok": "the pinned drive", "mismatch": "NOT the pinned drive",
                   "unverified": "cannot be identified",
                   "to pin": "no pin yet: pinned at the next start (or --accept)",
                   "pinned for another VM": "another VM's pinned drive: not pinned on trust",
                   "cannot pin": "no pin yet, and it cannot be identified now"}[d["verdict"]]
        click.echo(f"{d['key']} -> {d['address']}: {d['now_description']}{how}: {verdict}")
    for p in info["pinned"]:
        from datetime import datetime

        when = datetime.fromtimestamp(p["time"]).strftime("%Y-%m-%d %H:%M")
        where = ", ".join(p["now_at"]) or "not on this node"
        click.echo(f"  {p['key']} pinned: {p['description']} (firmware"
                   f" {p['identity'].get('firmware') or '?'}), at {p['pinned_at']} on {when}"
                   f" ({p['how']}); now: {where} ({p['state']})")
    for line in info["lines"]:
        if "no hostpci devices" in line:
            click.echo(line)
    for r in info["refusals"]:
        click.echo(f"refused: {r['message']}")
    cctx.exit(0)
