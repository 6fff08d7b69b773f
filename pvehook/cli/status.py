"""`pvehook list`, `status`, `iommu`, `check`: what the hook sees and would do, read from
/etc/pve and sysfs (no API). Each *_data function returns plain data, ready for --json;
the commands render it.
"""

from __future__ import annotations

import os

import click

from .. import guestlist
from .. import iommu as iommu_groups
from ..block import controller_serial, namespaces
from ..context import Context
from ..errors import ConfigError, PvehookError
from ..holds import Holds, vm_running
from ..mapping import load_pci_mappings
from ..openers import Openers
from ..paths import Root
from ..pci import PciAddress, PciDevice
from ..pins import PinStore, boot_id, drive_report, inspect_vm
from ..resolve import alternatives
from ..storagecfg import load_storage_cfg, lvm_volume
from ..units import human_size
from ..usage import host_use
from ..vmconfig import VmConfig
from .configs import context, is_ours, read_or_none, vm_configs
from .entry import VMID, cli, emit_json, json_option, vmid_completion

def _entry_text(entry) -> str:
    return f"mapping={entry.mapping}" if entry.mapping else f"host={entry.host}"


def list_data(ctx: Context) -> list[dict]:
    root = ctx.root
    try:
        storages = load_storage_cfg(root)
    except ConfigError:
        storages = {}
    existing = [d.address for d in PciDevice.all(root)]
    mappings = load_pci_mappings(root)
    out = []
    for node, vmid, conf in vm_configs(root):
        if isinstance(conf, ConfigError) or not is_ours(conf.hookscript):
            continue
        item = {"vmid": vmid, "node": node, "hookscript": conf.hookscript,
                "running": vm_running(root, vmid) if node == ctx.node else None,
                "devices": [], "lvm_disks": [], "errors": [],
                "reserved": sorted(guestlist.addresses_of(root, guestlist.RESERVED, vmid))
                if node == ctx.node else []}
        for entry in conf.hostpci:
            dev = {"key": entry.key, "config": _entry_text(entry), "managed": None,
                   "addresses": [], "why": None}
            if entry.keeps_driver:
                dev.update(managed=False, why="driver=keep: left to Proxmox")
            elif entry.mdev is not None:
                dev.update(managed=False, why="mediated device: left to Proxmox")
            elif node == ctx.node:
                try:
                    addrs = sorted({a for alt in alternatives(entry, existing, mappings, node)
                                    for a in alt})
                except PvehookError as e:
                    dev["why"] = str(e)
                    addrs = []
                nvme = [a for a in addrs if PciDevice(root, a).is_nvme]
                dev["addresses"] = [str(a) for a in addrs]
                dev["managed"] = bool(nvme)
                dev["why"] = dev["why"] or ("NVMe: pvehook binds and gives it back" if nvme
                                            else "not NVMe: left to Proxmox")
            else:
                dev["why"] = f"on node {node}: see `pvehook status` there"
            item["devices"].append(dev)
        item["pins"] = _list_pins(ctx, vmid) if node == ctx.node else []
        for disk in conf.disks:
            try:
                vol = lvm_volume(storages, disk)
            except ConfigError as e:
                item["errors"].append(str(e))
                continue
            if vol is not None:
                item["lvm_disks"].append({"key": disk.key, "volume": disk.volume,
                                          "lv": vol.dev_path, "thin": vol.thinpool is not None})
        out.append(item)
    return out


def _list_pins(ctx: Context, vmid: int) -> list[dict]:
    """The VM's pinned drives and where they are now."""
    try:
        info = inspect_vm(ctx, vmid)
    except (PvehookError, PermissionError):
        return []
    return [{k: p[k] for k in ("key", "description", "identity", "pinned_at", "now_at", "state")}
            for p in info["pinned"]]


def _pins(root: Root) -> tuple[dict, str | None]:
    """The pin store (empty where it cannot be read: not root) and this boot's id."""
    try:
        data = PinStore(root).load()
    except PermissionError:
        data = {"vms": {}, "seen": {}}
    return data, boot_id(root)


def _ctrl_attr(dev: PciDevice, name: str) -> str | None:
    base = dev.sys_path / "nvme"
    try:
        for ctrl in sorted(os.listdir(base)):
            return (base / ctrl / name).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        pass
    return None


def group_verdict(root: Root, dev: PciDevice) -> dict:
    group = dev.iommu_group
    if not iommu_groups.iommu_enabled(root):
        return {"group": None, "ok": False, "verdict": "IOMMU off"}
    if group is None:
        return {"group": None, "ok": False, "verdict": "no IOMMU group"}
    members = iommu_groups.member_verdicts(root, group, {dev.address})
    bad = [m for m in members if not m.ok]
    if bad:
        names = ", ".join(f"{m.device.address} ({m.driver})" for m in bad)
        return {"group": int(group), "ok": False,
                "verdict": f"shared with host devices: {names}"}
    others = [m for m in members if m.device.address != dev.address]
    return {"group": int(group), "ok": True,
            "verdict": "isolated" if not others else
            "isolated (" + ", ".join(f"{m.device.address}: {m.verdict}" for m in others) + ")"}


def vms_naming(ctx: Context) -> dict[PciAddress, list[int]]:
    """Every PCI function any VM of this node names (all mapping alternatives)."""
    existing = [d.address for d in PciDevice.all(ctx.root)]
    mappings = load_pci_mappings(ctx.root)
    out: dict[PciAddress, list[int]] = {}
    for _node, vmid, conf in vm_configs(ctx.root, ctx.node):
        if isinstance(conf, ConfigError):
            continue
        for entry in conf.hostpci:
            try:
                alts = alternatives(entry, existing, mappings, ctx.node)
            except PvehookError:
                continue
            for alt in alts:
                for a in alt:
                    if vmid not in out.setdefault(a, []):
                        out[a].append(vmid)
    return out


def status_data(ctx: Context, vmid: int | None = None) -> list[dict]:
    root = ctx.root
    naming = vms_naming(ctx)
    holds = Holds(root, ctx.records, -1)
    openers = Openers(root)  # one /proc scan for every namespace
    pins_data, boot = _pins(root)
    reserved = guestlist.read(root, guestlist.RESERVED)
    if vmid is not None:
        VmConfig.load(root, vmid)  # a clear error when the VM is not on this node
    out = []
    for dev in PciDevice.all(root):
        if not dev.is_nvme:
            continue
        if vmid is not None and vmid not in naming.get(dev.address, []):
            continue
        item = {"address": str(dev.address), "id": dev.vendor_device,
                "model": _ctrl_attr(dev, "model"), "serial": controller_serial(dev),
                "driver": dev.driver, "driver_override": dev.driver_override,
                **group_verdict(root, dev), "namespaces": [],
                "vms": naming.get(dev.address, []), "held_by": holds.holder(dev.address),
                "reserved_for": sorted(reserved.get(str(dev.address), set()))}
        item.update(drive_report(ctx, dev, pins_data, boot))
        if dev.driver:
            for disk in namespaces(dev):
                ns = {"name": disk.name, "size_bytes": None, "host_use": [], "notes": []}
                size = read_or_none(disk.sys_path / "size")
                ns["size_bytes"] = int(size) * 512 if size and size.isdigit() else None
                try:
                    use = host_use(root, ctx.kernel, [disk], openers)
                    ns["host_use"], ns["notes"] = use.reasons, use.notes
                except OSError as e:
                    if isinstance(e, PermissionError):
                        raise
                    ns["notes"].append(f"cannot check: {e.strerror or e}")
                item["namespaces"].append(ns)
            item["vg_name_clashes"] = _vg_name_clashes(namespaces(dev))
        out.append(item)
    return out


def _vg_name_clashes(disks) -> list[dict]:
    """Volume groups on these disks named like another VG of the host (see
    pvehook.lvm.name_clashes); empty when lvm cannot be run or fails."""
    from ..lvm import name_clashes

    try:
        return [{"vg": name, "other_pvs": others} for name, others in name_clashes(disks)]
    except (OSError, ValueError):
        return []


def iommu_data(root: Root) -> dict:
    enabled = iommu_groups.iommu_enabled(root)
    try:
        names = os.listdir(root.sys("kernel", "iommu_groups"))
    except FileNotFoundError:
        names = []
    groups = []
    for g in sorted((n for n in names if n.isdigit()), key=int):
        members = iommu_groups.group_members(root, g)
        devs = [{"address": str(m.address), "driver": m.driver, "class": f"{m.class_code:06x}",
                 "id": m.vendor_device, "bridge": m.is_bridge, "nvme": m.is_nvme}
                for m in members]
        endpoints = [m for m in members if not m.is_bridge]
        slots = {(m.address.domain, m.address.bus, m.address.slot) for m in endpoints}
        if not endpoints:
            verdict, ok = "bridges only: nothing to give to a VM", False
        elif len(slots) == 1:
            verdict, ok = ("can be given to a VM" + (
                " (all functions of the slot together)" if len(endpoints) > 1 else "")), True
        else:
            host = [m for m in endpoints if m.driver not in (None, iommu_groups.VFIO)]
            verdict, ok = ("only as a whole: every device in it must go to the same VM" + (
                "; the host uses " + ", ".join(f"{m.address} ({m.driver})" for m in host)
                if host else "")), False
        groups.append({"group": int(g), "devices": devs, "ok": ok, "verdict": verdict})
    return {"iommu_enabled": enabled, "groups": groups}


def check_data(ctx: Context, vmid: int) -> dict:
    """pre-start's decisions, without locks and without changing anything."""
    from ..plan import dry_run

    plan = dry_run(ctx, vmid)
    config = VmConfig.load(ctx.root, vmid)
    code = plan.refusals[0].exit_code if plan.refusals else 0
    return {"vmid": vmid, "lines": plan.lines,
            "refusals": [{"message": str(e), "kind": type(e).__name__, "exit_code": e.exit_code}
                         for e in plan.refusals],
            "would_bind": [{"address": str(s.device.address), "from": s.original_driver}
                           for s in plan.steps] if not plan.refusals else [],
            "stays": [str(s.device.address) for s in plan.stays] if not plan.refusals else [],
            "hookscript": config.hookscript, "registered": is_ours(config.hookscript),
            "pins": plan.pins.results if plan.pins is not None else [],
            "exit_code": code}


@cli.command("list", epilog="\b\nExample:\n  pvehook list --json")
@json_option
@click.pass_context
def list_(cctx, as_json):
    """VMs with the hook registered: node, managed devices, LVM disks."""
    data = list_data(context())
    if as_json:
        emit_json(data)
        cctx.exit(0)
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
        if vm.get("reserved"):
            click.echo(f"  reserved: {', '.join(vm['reserved'])} (on vfio-pci from boot on)")
        for p in vm.get("pins", []):
            where = ", ".join(p["now_at"]) or "not on this node"
            click.echo(f"  {p['key']} pinned: {p['description']}: {p['state']} ({where})")
        for err in vm["errors"]:
            click.echo(f"  error: {err}")
    cctx.exit(0)


@cli.command(epilog="\b\nExamples:\n  pvehook status\n  pvehook status 100 --json")
@click.argument("vmid", required=False, type=VMID, shell_complete=vmid_completion)
@json_option
@click.pass_context
def status(cctx, vmid, as_json):
    """NVMe controllers of this node: driver, IOMMU group, disks, VMs.

    With VMID, only the controllers that VM's config names.
    """
    data = status_data(context(), vmid)
    if as_json:
        emit_json(data)
        cctx.exit(0)
    if not data:
        click.echo("no NVMe controller" + (f" named by VM {vmid}" if vmid else " on this node"))
    for c in data:
        click.echo(f"{c['address']}  {c['id']}  {c['model'] or '?'}  serial {c['serial'] or '?'}")
        override = f" (driver_override {c['driver_override']})" if c["driver_override"] else ""
        group = f"IOMMU group {c['group']}: " if c["group"] is not None else ""
        click.echo(f"  driver {c['driver'] or 'none'}{override}; {group}{c['verdict']}")
        for ns in c["namespaces"]:
            use = "; ".join(ns["host_use"]) if ns["host_use"] else "not used by the host"
            size = "?" if ns["size_bytes"] is None else human_size(ns["size_bytes"])
            click.echo(f"  {ns['name']} ({size}): {use}")
            for note in ns["notes"]:
                click.echo(f"    {note}")
        if not c["namespaces"]:
            click.echo("  no namespaces visible" + (" (not on nvme)" if c["driver"] != "nvme" else ""))
        vms = ", ".join(map(str, c["vms"])) or "none"
        click.echo(f"  named by VM: {vms}; held by: {c['held_by'] or 'nobody'}")
        click.echo(f"  drive: {_identity_line(c)}")
        for clash in c.get("vg_name_clashes", []):
            click.echo(f"  warning: its volume group {clash['vg']!r} has the name of the host's"
                       f" on {', '.join(clash['other_pvs'])}: LVM commands naming"
                       f" {clash['vg']!r} refuse while this disk is on the host; `pvehook"
                       f" reserve <vmid>` keeps it on vfio-pci")
        if c.get("reserved_for"):
            click.echo(f"  reserved for VM {', '.join(map(str, c['reserved_for']))}:"
                       " on vfio-pci from boot on")
    cctx.exit(0)


def _identity_line(c: dict) -> str:
    from ..identity import describe

    ident, source = c.get("identity"), c.get("identity_source")
    if ident is None:
        return "cannot be identified (not on nvme, no PCIe Device Serial Number)"
    parts = [describe(ident)]
    if ident.get("firmware"):
        parts.append(f"firmware {ident['firmware']}")
    if ident.get("dsn"):
        parts.append(f"DSN {ident['dsn']}")
    how = {"nvme": "", "dsn": " (by its PCIe Device Serial Number)",
           "recorded": " (as recorded when it was last on nvme)"}.get(source, "")
    pinned = ", ".join(c.get("pinned_for") or []) or "no VM"
    return ", ".join(parts) + how + f"; pinned for {pinned}"


@cli.command(epilog="\b\nExample:\n  pvehook iommu --json")
@json_option
@click.pass_context
def iommu(cctx, as_json):
    """Every IOMMU group: devices, drivers, classes, whether a VM can have it."""
    data = iommu_data(context().root)
    if as_json:
        emit_json(data)
        cctx.exit(0)
    if not data["iommu_enabled"]:
        click.echo("the IOMMU is off (/sys/class/iommu is empty): no device can be passed;"
                   " see `pvehook doctor`")
    for g in data["groups"]:
        click.echo(f"group {g['group']}: {g['verdict']}")
        for d in g["devices"]:
            kind = " bridge" if d["bridge"] else " NVMe" if d["nvme"] else ""
            click.echo(f"  {d['address']}  {d['id']}  class {d['class']}{kind}"
                       f"  driver {d['driver'] or 'none'}")
    cctx.exit(0)


@cli.command(epilog="""\b
Examples:
  pvehook check 100
  pvehook check 100 --json; echo "exit $?\"""")
@click.argument("vmid", type=VMID, shell_complete=vmid_completion)
@json_option
@click.pass_context
def check(cctx, vmid, as_json):
    """Dry run of pre-start for a VM of this node: every decision, nothing changed.

    Exits with the code the hook would give (see the exit codes in `pvehook --help`).
    """
    data = check_data(context(), vmid)
    if as_json:
        emit_json(data)
        cctx.exit(data["exit_code"])
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
    cctx.exit(data["exit_code"])
