"""`pvehook reserve` / `unreserve`: a VM's NVMe controllers on vfio-pci from boot on."""

from __future__ import annotations

import click

from .api import require_root
from .configs import context
from .entry import VMID, cli, emit_json, json_option, vmid_completion


@cli.command(epilog="""\b
Examples:
  pvehook reserve 100
  pvehook status 100""")
@click.argument("vmid", type=VMID, shell_complete=vmid_completion)
@json_option
@click.pass_context
def reserve(cctx, vmid, as_json):
    """Keep a VM's NVMe controllers on vfio-pci, from boot on.

    After the checks pre-start makes, binds the VM's controllers to vfio-pci now and
    lists their PCI addresses in /var/lib/pvehook/reserved: at every boot they go to
    vfio-pci before the host's nvme driver binds them (also from the initramfs), so the
    host never sees their disks. Exits as the hook would refuse (10, 11, 12, 13).
    """
    from ..reserve import reserve as do_reserve

    _run(cctx, do_reserve, vmid, as_json, "reserved")


@cli.command(epilog="\b\nExample:\n  pvehook unreserve 100")
@click.argument("vmid", type=VMID, shell_complete=vmid_completion)
@json_option
@click.pass_context
def unreserve(cctx, vmid, as_json):
    """Undo `pvehook reserve`: the controllers go back to nvme (now if the VM is
    stopped, at its post-stop if it runs) and the host sees their disks again."""
    from ..reserve import unreserve as do_unreserve

    _run(cctx, do_unreserve, vmid, as_json, "unreserved")


def _run(cctx, action, vmid: int, as_json: bool, key: str) -> None:
    """Run reserve/unreserve as root; its lines on stdout, or in the JSON."""
    require_root()
    lines: list[str] = []
    addrs = action(context(), vmid, lines.append if as_json else click.echo)
    if as_json:
        emit_json({"vmid": vmid, key: addrs, "lines": lines})
    cctx.exit(0)
