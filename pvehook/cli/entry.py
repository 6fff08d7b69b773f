"""The `pvehook` command: the click group, its shared options, and the one place where
errors become messages and exit codes (`PvehookGroup.invoke`). The commands live in the
modules beside this one; the hook never imports any of them.
"""

from __future__ import annotations

import json
import os

import click

from .. import __version__
from .. import exitcodes as codes
from ..errors import NotRootError, PvehookError

MAIN_HELP = f"""Safe NVMe passthrough for Proxmox VE: opt VMs in to the pvehook hookscript
and see what it will do. Run as root on a Proxmox VE node.

\b
Examples:
  pvehook doctor                     is this node ready?
  pvehook check 100                  what would the hook do if VM 100 started now?
  pvehook register 100 101           opt VMs 100 and 101 in
  pvehook register 100 --enable-snippets local
  pvehook status --json              NVMe controllers, for scripts
  pvehook import-raw 100 /dev/disk/by-id/nvme-X local-lvm   seed a VM's disk
  pvehook release 100                give a stopped VM's devices back to the host
  pvehook unregister 100

\b
Shell completion (bash; zsh and fish likewise):
  eval "$(_PVEHOOK_COMPLETE=bash_source pvehook)"

{codes.help_text()}
"""


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def vmid_completion(ctx, param, incomplete):
    try:
        from .configs import context, vm_configs

        return [str(v) for _n, v, _c in vm_configs(context().root) if str(v).startswith(incomplete)]
    except Exception:  # completion must never fail loudly
        return []


class VmidType(click.ParamType):
    """Proxmox's pve-vmid: 100 to 999999999, ASCII digits only (int() reads '١٢٣' as 123)."""

    name = "vmid"

    def convert(self, value, param, ctx):
        from ..hook import is_vmid

        if not is_vmid(str(value)):
            self.fail(f"{value!r} is not a Proxmox VM id (100 to 999999999, ASCII digits)",
                      param, ctx)
        return int(value)


VMID = VmidType()


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")


class PvehookGroup(click.Group):
    """Turns pvehook's errors into one line on stderr and the error's exit code; commands
    end with `ctx.exit(code)` themselves."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PvehookError as e:
            click.echo(f"pvehook: error: {' '.join(str(e).split())}", err=True)
            ctx.exit(e.exit_code)
        except PermissionError as e:
            what = f"permission denied: {e.filename or e}"
            # As root, a permission error is not about being root (a read-only mount, an
            # immutable file, an LSM): say what was refused, with exit 1.
            err = (NotRootError(what, hint="run pvehook as root") if os.geteuid() != 0
                   else PvehookError(what))
            click.echo(f"pvehook: error: {err}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            ctx.exit(130)


@click.group(cls=PvehookGroup, help=MAIN_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pvehook", message="%(prog)s %(version)s")
def cli() -> None:
    pass


def main(argv: list[str] | None = None) -> None:
    """The console script: click's standalone mode exits with the command's code."""
    cli.main(args=argv, prog_name="pvehook")
