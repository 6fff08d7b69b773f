"""`pvehook`: opt VMs in to the hookscript and see what it will do.

Errors are raised as pvehook.errors subclasses everywhere; only `main` turns them into a
one-line message and an exit code.
"""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .errors import PvehookError, UsageError

EXIT_CODES = """\b
Exit codes:
  0   done / the node is ready / check: the hook would start the VM
  1   error (a Proxmox API error, an unreadable or malformed config)
  2   bad usage
  3   check: a hostpci id or mapping names no device on this node
  4   not root
  5   not a Proxmox VE node (no pvesh/pvesm, or no usable proxmoxer)
  6   the VM does not exist (or is a container)
  7   storage: missing, not a directory storage, or no snippets content
  8   the VM already has another hookscript (use --force)
  9   doctor: the node is not ready
  10-15 check: the hook's refusal (10 IOMMU, 11 disk in use by the host,
      12 held by another VM, 13 bind, 14 give-back, 15 volume);
      import-raw: 11 the host uses the source disk
  16  import-raw: the VM is running, locked, or on another node
  17  import-raw: the source starts with a disk-image or LUKS header, or
      its first sector cannot be read; (import-raw: 12 a VM start holds the
      source controller's lock)"""

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
  pvehook unregister 100

\b
Shell completion (bash; zsh and fish likewise):
  eval "$(_PVEHOOK_COMPLETE=bash_source pvehook)"

{EXIT_CODES}
"""


def _emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def _vmid_completion(ctx, param, incomplete):
    try:
        from .report import context, vm_configs

        return [str(v) for _n, v, _c in vm_configs(context().root) if str(v).startswith(incomplete)]
    except Exception:  # completion must never fail loudly
        return []


class VmidType(click.ParamType):
    """Proxmox's pve-vmid: 100 to 999999999, ASCII digits only (int() reads '١٢٣' as 123)."""

    name = "vmid"

    def convert(self, value, param, ctx):
        from .hook import is_vmid

        if not is_vmid(str(value)):
            self.fail(f"{value!r} is not a Proxmox VM id (100 to 999999999, ASCII digits)",
                      param, ctx)
        return int(value)


VMID = VmidType()
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")


@click.group(help=MAIN_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pvehook", message="%(prog)s %(version)s")
def cli() -> None:
    pass


# -- register / unregister ------------------------------------------------------------------

def _api():
    from .pve import Pve, require_root

    require_root()
    return Pve()


def _print_outcome(out, as_json: bool, verb: str) -> int:
    if as_json:
        _emit_json(out.as_dict())
    else:
        if out.content_enabled:
            click.echo(f"storage {out.storage}: snippets content enabled")
        if out.snippet:
            click.echo(f"snippet {out.snippet}: {'written' if out.snippet_written else 'up to date'}")
        for d in out.done:
            extra = f" (was {d['old']})" if d["action"] == "registered" and d["old"] else ""
            click.echo(f"VM {d['vmid']} on {d['node']}: {d['action']}{extra}")
        for w in out.warnings:
            click.echo(f"pvehook: warning: {w}", err=True)
    if out.error is None:
        return 0
    done = [str(d["vmid"]) for d in out.done if d["action"] in ("registered", "unregistered")]
    state = []
    if out.content_enabled:
        state.append(f"snippets content was enabled on {out.storage}")
    if out.snippet_written:
        state.append(f"the snippet {out.snippet} was written")
    state.append(f"VM {', '.join(done)} {verb}" if done else f"no VM was {verb}")
    out.error.args = (f"{out.error.args[0]} ({'; '.join(state)})",)
    raise out.error


@cli.command(epilog="""\b
Examples:
  pvehook register 100
  pvehook register 100 101 --storage nfs-shared
  pvehook register 100 --enable-snippets local
  pvehook register 100 --force      replace another hookscript""")
@click.argument("vmids", nargs=-1, required=True, type=VMID, shell_complete=_vmid_completion)
@click.option("--storage", metavar="S", help="Directory storage for the snippet"
              " (default: the first one with snippets content).")
@click.option("--enable-snippets", metavar="S", help="Add 'snippets' to storage S's content"
              " (keeping its other types) and use it.")
@click.option("--force", is_flag=True, help="Replace a hookscript that is not pvehook's.")
@json_option
def register(vmids, storage, enable_snippets, force, as_json):
    """Set pvehook as the hookscript of VMs (on any node of the cluster).

    Writes the snippet pvehook-hook (a two-line script that runs the installed hook) to a
    directory storage with snippets content, then sets each VM's hookscript to it.
    """
    from .pve import register as do_register
    from .report import context

    if storage and enable_snippets and storage != enable_snippets:
        raise UsageError("--storage and --enable-snippets name different storages")
    pve = _api()
    ctx = context()
    out = do_register(pve, ctx.root, list(dict.fromkeys(vmids)), ctx.node, storage,
                      enable_snippets, force)
    return _print_outcome(out, as_json, "registered")


@cli.command(epilog="\b\nExample:\n  pvehook unregister 100 101")
@click.argument("vmids", nargs=-1, required=True, type=VMID, shell_complete=_vmid_completion)
@json_option
def unregister(vmids, as_json):
    """Remove pvehook as the hookscript of VMs (another hookscript is left alone)."""
    from .pve import unregister as do_unregister

    out = do_unregister(_api(), list(dict.fromkeys(vmids)))
    return _print_outcome(out, as_json, "unregistered")


# -- list / status / iommu / check / doctor ----------------------------------------------

@cli.command("list", epilog="\b\nExample:\n  pvehook list --json")
@json_option
def list_(as_json):
    """VMs with the hook registered: node, managed devices, LVM disks."""
    from .report import context, list_data

    data = list_data(context())
    if as_json:
        _emit_json(data)
        return 0
    if not data:
        click.echo("no VM has pvehook's hookscript (see `pvehook register --help`)")
    for vm in data:
        running = {True: ", running", False: ", stopped", None: ""}[vm["running"]]
        click.echo(f"VM {vm['vmid']} on {vm['node']}{running}: {vm['hookscript']}")
        for d in vm["devices"]:
            addrs = f" -> {', '.join(d['addresses'])}" if d["addresses"] else ""
            click.echo(f"  {d['key']}: {d['config']}{addrs}: {d['why']}")
        if not vm["devices"]:
            click.echo("  no hostpci devices")
        for disk in vm["lvm_disks"]:
            click.echo(f"  {disk['key']}: {disk['volume']} = {disk['lv']}"
                       f" ({'thin' if disk['thin'] else 'thick'} LVM)")
        for err in vm["errors"]:
            click.echo(f"  error: {err}")
    return 0


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "?"


@cli.command(epilog="\b\nExamples:\n  pvehook status\n  pvehook status 100 --json")
@click.argument("vmid", required=False, type=VMID, shell_complete=_vmid_completion)
@json_option
def status(vmid, as_json):
    """NVMe controllers of this node: driver, IOMMU group, disks, VMs.

    With VMID, only the controllers that VM's config names.
    """
    from .report import context, status_data

    data = status_data(context(), vmid)
    if as_json:
        _emit_json(data)
        return 0
    if not data:
        click.echo("no NVMe controller" + (f" named by VM {vmid}" if vmid else " on this node"))
    for c in data:
        click.echo(f"{c['address']}  {c['id']}  {c['model'] or '?'}  serial {c['serial'] or '?'}")
        override = f" (driver_override {c['driver_override']})" if c["driver_override"] else ""
        group = f"IOMMU group {c['group']}: " if c["group"] is not None else ""
        click.echo(f"  driver {c['driver'] or 'none'}{override}; {group}{c['verdict']}")
        for ns in c["namespaces"]:
            use = "; ".join(ns["host_use"]) if ns["host_use"] else "not used by the host"
            click.echo(f"  {ns['name']} ({_size(ns['size_bytes'])}): {use}")
            for note in ns["notes"]:
                click.echo(f"    {note}")
        if not c["namespaces"]:
            click.echo("  no namespaces visible" + (" (not on nvme)" if c["driver"] != "nvme" else ""))
        vms = ", ".join(map(str, c["vms"])) or "none"
        click.echo(f"  named by VM: {vms}; held by: {c['held_by'] or 'nobody'}")
    return 0


@cli.command(epilog="\b\nExample:\n  pvehook iommu --json")
@json_option
def iommu(as_json):
    """Every IOMMU group: devices, drivers, classes, whether a VM can have it."""
    from .report import context, iommu_data

    data = iommu_data(context().root)
    if as_json:
        _emit_json(data)
        return 0
    if not data["iommu_enabled"]:
        click.echo("the IOMMU is off (/sys/class/iommu is empty): no device can be passed;"
                   " see `pvehook doctor`")
    for g in data["groups"]:
        click.echo(f"group {g['group']}: {g['verdict']}")
        for d in g["devices"]:
            kind = " bridge" if d["bridge"] else " NVMe" if d["nvme"] else ""
            click.echo(f"  {d['address']}  {d['id']}  class {d['class']}{kind}"
                       f"  driver {d['driver'] or 'none'}")
    return 0


@cli.command(epilog="""\b
Examples:
  pvehook check 100
  pvehook check 100 --json; echo "exit $?\"""")
@click.argument("vmid", type=VMID, shell_complete=_vmid_completion)
@json_option
def check(vmid, as_json):
    """Dry run of pre-start for a VM of this node: every decision, nothing changed.

    Exits with the code the hook would give (see the exit codes in `pvehook --help`).
    """
    from .report import check_data, context

    data = check_data(context(), vmid)
    if as_json:
        _emit_json(data)
        return data["exit_code"]
    for line in data["lines"]:
        click.echo(line)
    for r in data["refusals"]:
        click.echo(f"refused: {r['message']}")
    for b in data["would_bind"]:
        click.echo(f"would bind {b['address']}: {b['from'] or 'no driver'} -> vfio-pci")
    if data["refusals"]:
        click.echo(f"the hook would refuse to start VM {vmid} (exit {data['exit_code']})")
    else:
        click.echo(f"the hook would let VM {vmid} start")
    if not data["registered"]:
        click.echo(f"note: VM {vmid} does not use pvehook's hookscript"
                   f" ({data['hookscript'] or 'none'}); `pvehook register {vmid}` opts it in")
    return data["exit_code"]


@cli.command(epilog="\b\nExample:\n  pvehook doctor --json")
@json_option
def doctor(as_json):
    """Is this node ready? IOMMU, interrupt remapping, vfio, snippets, registrations."""
    from .report import NodeNotReadyError, context, doctor_data

    data = doctor_data(context())
    errors = [f for f in data if f["status"] == "error"]
    if as_json:
        _emit_json(data)
    else:
        for f in data:
            click.echo(f"[{f['status']:5}] {f['check']}: {f['message']}")
            if f["fix"] and f["status"] != "ok":
                click.echo(f"        fix: {f['fix']}")
    if errors:
        raise NodeNotReadyError(f"{len(errors)} problem(s) found: "
                                + "; ".join(f["check"] for f in errors),
                                hint="see the fixes above")
    return 0


# -- import-raw ------------------------------------------------------------------------------

@cli.command("import-raw", epilog="""\b
Examples:
  pvehook import-raw 100 /dev/disk/by-id/nvme-Samsung_SSD_990_PRO_S7X local-lvm
  pvehook import-raw 100 /dev/nvme1n1 local-lvm --bus scsi1 --cache none --dry-run

\b
The same as `qm importdisk 100 /dev/nvme1n1 local-lvm --format raw` followed by
`qm set 100 -scsi0 local-lvm:vm-100-disk-0,cache=writeback,discard=on`, as one
Proxmox request (POST /nodes/<node>/qemu/100/config -scsi0
local-lvm:0,import-from=/dev/nvme1n1,format=raw,...), after checking that the VM is
stopped, the host does not use the disk and the storage is LVM.

\b
Exit codes: 0 done; 1 Proxmox refused or the import task failed; 2 bad usage (the
source is not a whole block device, the slot is taken); 4 not root; 5 not a Proxmox
VE node; 6 no such VM; 7 storage missing, not lvm/lvmthin, or no snippets storage
to register the hookscript; 8 the VM has another hookscript (--no-register); 11 the
host uses the source disk; 12 a VM starting or stopping holds the source controller's
lock; 16 the VM is running, locked or on another node; 17 the source starts with a
disk-image or LUKS header, or its first sector cannot be read.""")
@click.argument("vmid", type=VMID, shell_complete=_vmid_completion)
@click.argument("source", metavar="SOURCE_DISK")
@click.argument("storage")
@click.option("--bus", "key", default="scsi0", show_default=True, metavar="SLOT",
              help="Disk slot of the VM to attach it to (scsiN, virtioN, sataN, ideN).")
@click.option("--cache", type=click.Choice(["writeback", "none", "writethrough", "directsync",
                                            "unsafe", "default"]),
              default="writeback", show_default=True,
              help="Cache mode of the new disk ('default': leave it to Proxmox).")
@click.option("--no-discard", is_flag=True, help="Do not set discard=on.")
@click.option("--no-register", is_flag=True, help="Do not set pvehook as the VM's hookscript.")
@click.option("--snippets-storage", metavar="S", help="Directory storage for the hookscript"
              " snippet (as `register --storage`).")
@click.option("--dry-run", is_flag=True, help="Check everything and print what would be done.")
@json_option
def import_raw(vmid, source, storage, key, cache, no_discard, no_register, snippets_storage,
               dry_run, as_json):
    """Copy a whole disk into a new RAW LVM volume of a stopped VM and attach it.

    SOURCE_DISK is a whole block device (/dev/nvme0n1, or a /dev/disk/by-id/ link to one);
    STORAGE an lvm or lvmthin storage. The copy runs as a Proxmox task (qemu-img), its
    progress is shown as it goes. Then pvehook is registered as the VM's hookscript.
    """
    from .importraw import plan_import, run_import
    from .pve import register as do_register
    from .report import context

    def echo(line: str) -> None:
        click.echo(line, err=as_json)

    key = key.lower()
    pve = _api()
    ctx = context()
    plan = plan_import(pve, ctx, vmid, source, storage, key.lower(),
                       None if cache == "default" else cache, not no_discard,
                       not no_register, snippets_storage)
    for line in plan.lines:
        echo(line)
    for note in plan.notes:
        echo(f"note: {note}")
    if dry_run:
        echo("would run: " + " ".join(plan.pvesh_argv))
        if plan.hookscript:
            echo(f"would register the hookscript {plan.hookscript} on VM {vmid}")
        echo("dry run: nothing changed")
        plan.release()
        if as_json:
            _emit_json({**plan.as_dict(), "dry_run": True})
        return 0
    done = run_import(pve, plan, echo)
    echo(f"VM {vmid}: {key}: {done['config']}")
    for w in done["warnings"]:
        click.echo(f"pvehook: warning: {w}", err=True)
    result = {**plan.as_dict(), "dry_run": False, **done, "registered": None}
    if plan.hookscript:
        out = do_register(pve, ctx.root, [vmid], ctx.node, snippets_storage)
        result["registered"] = out.as_dict()
        if out.error is not None:
            out.error.args = (f"{out.error.args[0]} (the disk was imported and attached as"
                              f" {key}: {done['volume']})",)
        if not as_json:
            return _print_outcome(out, False, "registered")
        _emit_json(result)
        if out.error is not None:
            raise out.error
        return 0
    if as_json:
        _emit_json(result)
    return 0


# -- entry ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="pvehook", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("pvehook: aborted", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except PvehookError as e:
        click.echo(f"pvehook: error: {' '.join(str(e).split())}", err=True)
        sys.exit(e.exit_code)
    except PermissionError as e:
        from .pve import NotRootError

        err = NotRootError(f"permission denied: {e.filename or e}", hint="run pvehook as root")
        click.echo(f"pvehook: error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
