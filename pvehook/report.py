"""What the CLI reports without the Proxmox API: list, status, iommu, check, doctor.

Everything is read through the `Root` of a `Context` (/etc/pve, /sys, /proc, /run), so it
runs on a fake tree in tests and on a node where pvesh is unavailable. Each function
returns plain data (dicts and lists, ready for --json); the CLI renders it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from . import __version__, iommu
from .block import controller_serial, namespaces
from .context import Context, node_name
from .errors import ConfigError, PvehookError
from .holds import Holds, vm_running
from .hook import is_vmid
from .mapping import load_pci_mappings
from .paths import Root
from .pci import PciAddress, PciDevice
from .pve import DIR_TYPES, HOOK_PATH, SNIPPET_NAME, is_ours
from .resolve import alternatives
from .storagecfg import load_storage_cfg, lvm_volume
from .usage import host_use
from .vmconfig import VmConfig


class NodeNotReadyError(PvehookError):
    """doctor found at least one problem."""

    exit_code = 9


def local_node(root: Root) -> str:
    """This node's name: /etc/pve/local links to nodes/<name> on a Proxmox node."""
    try:
        return os.path.basename(os.readlink(root.pve("local")).rstrip("/"))
    except OSError:
        return node_name()


def context() -> Context:
    root = Root.from_env()
    return Context(root=root, node=local_node(root))


# -- VM configs --------------------------------------------------------------------------

def vm_configs(root: Root, node: str | None = None) -> list[tuple[str, int, VmConfig | ConfigError]]:
    """(node, vmid, config or its parse error) of every VM in the cluster (or one node)."""
    out = []
    try:
        dirs = [(n, root.pve("nodes", n, "qemu-server")) for n in sorted(os.listdir(root.pve("nodes")))]
    except FileNotFoundError:
        dirs = []
    own = root.pve("qemu-server")
    if own.is_dir() and not own.is_symlink() and not dirs:
        dirs = [(local_node(root), own)]  # a lone node's tree without nodes/ (tests, guests)
    for n, d in dirs:
        if node is not None and n != node:
            continue
        try:
            names = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            if not (name.endswith(".conf") and is_vmid(name[:-5])):  # not "².conf"
                continue
            vmid = int(name[:-5])
            path = d / name
            try:
                conf = VmConfig.from_text(vmid, path.read_bytes().decode("utf-8", "replace"), str(path))
            except ConfigError as e:
                conf = e
            except PermissionError:
                raise
            except OSError as e:
                conf = ConfigError(f"cannot read {path}: {e.strerror or e}")
            out.append((n, vmid, conf))
    out.sort(key=lambda t: t[1])
    return out


def registered_vms(root: Root) -> list[tuple[int, str, str]]:
    """(vmid, node, hookscript volume) of every VM whose hookscript is pvehook's."""
    return [(vmid, n, conf.hookscript) for n, vmid, conf in vm_configs(root)
            if isinstance(conf, VmConfig) and is_ours(conf.hookscript)]


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
                "devices": [], "lvm_disks": [], "errors": []}
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


# -- status ------------------------------------------------------------------------------

def _ctrl_attr(dev: PciDevice, name: str) -> str | None:
    base = dev.sys_path / "nvme"
    try:
        for ctrl in sorted(os.listdir(base)):
            return (base / ctrl / name).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        pass
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def group_verdict(root: Root, dev: PciDevice) -> dict:
    group = dev.iommu_group
    if not iommu.iommu_enabled(root):
        return {"group": None, "ok": False, "verdict": "IOMMU off"}
    if group is None:
        return {"group": None, "ok": False, "verdict": "no IOMMU group"}
    members = iommu.member_verdicts(root, group, {dev.address})
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
    holds = Holds(root, ctx.journal, -1)
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
                "vms": naming.get(dev.address, []), "held_by": holds.holder(dev.address)}
        if dev.driver:
            for disk in namespaces(dev):
                ns = {"name": disk.name, "size_bytes": None, "host_use": [], "notes": []}
                size = _read(disk.sys_path / "size")
                ns["size_bytes"] = int(size) * 512 if size and size.isdigit() else None
                try:
                    use = host_use(root, ctx.kernel, [disk])
                    ns["host_use"], ns["notes"] = use.reasons, use.notes
                except OSError as e:
                    if isinstance(e, PermissionError):
                        raise
                    ns["notes"].append(f"cannot check: {e.strerror or e}")
                item["namespaces"].append(ns)
        out.append(item)
    return out


# -- iommu -------------------------------------------------------------------------------

def iommu_data(root: Root) -> dict:
    enabled = iommu.iommu_enabled(root)
    try:
        names = os.listdir(root.sys("kernel", "iommu_groups"))
    except FileNotFoundError:
        names = []
    groups = []
    for g in sorted((n for n in names if n.isdigit()), key=int):
        members = iommu.group_members(root, g)
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
            host = [m for m in endpoints if m.driver not in (None, iommu.VFIO)]
            verdict, ok = ("only as a whole: every device in it must go to the same VM" + (
                "; the host uses " + ", ".join(f"{m.address} ({m.driver})" for m in host)
                if host else "")), False
        groups.append({"group": int(g), "devices": devs, "ok": ok, "verdict": verdict})
    return {"iommu_enabled": enabled, "groups": groups}


# -- check -------------------------------------------------------------------------------

def check_data(ctx: Context, vmid: int) -> dict:
    """pre-start's decisions, without locks and without changing anything."""
    from .plan import dry_run

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
            "exit_code": code}


# -- doctor ------------------------------------------------------------------------------

def _finding(check: str, status: str, message: str, fix: str | None = None) -> dict:
    return {"check": check, "status": status, "message": message, "fix": fix}


def _cpu_vendor(root: Root) -> str:
    text = _read(root.proc("cpuinfo")) or ""
    return "amd" if "AuthenticAMD" in text else "intel" if "GenuineIntel" in text else "?"


_VFIO_IDS_RE = re.compile(r"^\s*options\s+vfio[-_]pci\s+(.*)$")


def vfio_ids(root: Root) -> list[tuple[str, str]]:
    """(where, vendor:device) of every vfio-pci ids= in modprobe.d and the command line."""
    out = []
    d = root.etc("modprobe.d")
    try:
        files = sorted(f for f in os.listdir(d) if f.endswith(".conf"))
    except FileNotFoundError:
        files = []
    for f in files:
        for n, line in enumerate((_read(d / f) or "").splitlines(), 1):
            m = _VFIO_IDS_RE.match(line)
            if not m:
                continue
            for opt in m[1].split():
                if opt.startswith("ids="):
                    out += [(f"/etc/modprobe.d/{f} line {n}", i.lower())
                            for i in opt[4:].split(",") if i]
    for tok in (_read(root.proc("cmdline")) or "").split():
        if tok.startswith(("vfio-pci.ids=", "vfio_pci.ids=")):
            out += [("the kernel command line", i.lower())
                    for i in tok.partition("=")[2].split(",") if i]
    return out


def _snippet_file(root: Root, storages, volid: str) -> Path | None:
    """Where Proxmox finds a snippet: `pvesm path` when there, else storage.cfg."""
    if shutil.which("pvesm"):
        from .pve import pvesm_path

        try:
            return pvesm_path(volid)
        except PvehookError:
            return None
    sid, _, volname = volid.partition(":")
    s = storages.get(sid)
    if s is None or s.type not in DIR_TYPES or not s.options.get("path"):
        return None
    sub = "snippets"
    for pair in (s.options.get("content-dirs") or "").split(","):
        k, _, v = pair.partition("=")
        if k == "snippets" and v:
            sub = v
    return root.path / s.options["path"].lstrip("/") / sub.lstrip("/") / volname.partition("/")[2]


def doctor_data(ctx: Context) -> list[dict]:
    root = ctx.root
    out = []
    cmdline = (_read(root.proc("cmdline")) or "").split()
    iommu_args = [t for t in cmdline if t.split("=")[0] in ("intel_iommu", "amd_iommu", "iommu")]
    vendor = _cpu_vendor(root)
    boot_fix = ("add it to the kernel command line (/etc/kernel/cmdline with systemd-boot, then"
                " proxmox-boot-tool refresh; or GRUB_CMDLINE_LINUX_DEFAULT in /etc/default/grub,"
                " then update-grub) and reboot")
    if iommu.iommu_enabled(root):
        units = ", ".join(sorted(os.listdir(root.sys("class", "iommu"))))
        out.append(_finding("iommu", "ok", f"IOMMU enabled ({units}); command line: "
                            f"{' '.join(iommu_args) or 'kernel default'}"))
    else:
        off = [t for t in iommu_args if t.endswith("=off")]
        out.append(_finding(
            "iommu", "error",
            "IOMMU is off: /sys/class/iommu is empty" + (f" ({' '.join(off)})" if off else ""),
            "enable VT-d (Intel) / AMD-Vi (AMD) in the firmware" + (
                "; " + ("intel_iommu=on: " if vendor != "amd" else "amd_iommu=on: ") + boot_fix
                if vendor != "amd" or off else "")))
    interrupts = _read(root.proc("interrupts"))
    unsafe = _read(root.sys("module", "vfio_iommu_type1", "parameters", "allow_unsafe_interrupts"))
    if interrupts is None:
        out.append(_finding("interrupt-remapping", "warn", "cannot read /proc/interrupts"))
    elif "IR-" in interrupts:
        out.append(_finding("interrupt-remapping", "ok", "interrupt remapping is active"))
    else:
        out.append(_finding(
            "interrupt-remapping", "warn" if unsafe == "Y" else "error",
            "interrupt remapping is not active" + (
                " (vfio allow_unsafe_interrupts=Y: devices can be passed, without protection"
                " against interrupt injection)" if unsafe == "Y" else
                ": vfio refuses to assign devices"),
            "enable interrupt remapping / x2APIC in the firmware; as a last resort"
            " `options vfio_iommu_type1 allow_unsafe_interrupts=1` in /etc/modprobe.d"))
    release = _read(root.proc("sys", "kernel", "osrelease")) or os.uname().release
    moddir = root.path / "lib" / "modules" / release
    if root.sys("bus", "pci", "drivers", "vfio-pci").is_dir() or root.sys("module", "vfio_pci").is_dir():
        out.append(_finding("vfio", "ok", "vfio-pci is loaded"))
    elif any("vfio-pci.ko" in (_read(moddir / f) or "") for f in ("modules.builtin", "modules.dep")):
        out.append(_finding("vfio", "ok", f"vfio-pci is available for kernel {release}"
                            " (loaded when a VM starts)"))
    else:
        out.append(_finding("vfio", "error", f"no vfio-pci module for kernel {release}",
                            "boot a Proxmox VE kernel (proxmox-kernel-*), which has vfio-pci"))
    nvme = [d for d in PciDevice.all(root) if d.is_nvme]
    ids = vfio_ids(root)
    for where, vd in ids:
        hits = [d for d in nvme if d.vendor_device == vd]
        if hits:
            out.append(_finding(
                "vfio-ids", "error",
                f"vfio-pci ids={vd} in {where} hands every drive with that id to vfio-pci at"
                f" boot: {', '.join(str(d.address) for d in hits)}",
                f"remove {vd} from it (pvehook binds by address, only when its VM starts), then"
                " update-initramfs -u -k all and reboot"))
        else:
            out.append(_finding("vfio-ids", "ok", f"vfio-pci ids={vd} in {where} matches no NVMe"
                                " controller of this node"))
    if not ids:
        out.append(_finding("vfio-ids", "ok", "no vfio-pci ids= that could capture drives"))
    try:
        storages = load_storage_cfg(root)
    except ConfigError as e:
        storages = {}
        out.append(_finding("storage", "error", str(e)))

    def on_node(s) -> bool:
        nodes = s.options.get("nodes")
        return s.options.get("disable") in (None, "0") and (
            not nodes or ctx.node in nodes.split(","))

    dirs = [s for s in storages.values() if s.type in DIR_TYPES and on_node(s)]
    snip = [s for s in dirs if "snippets" in s.options.get("content", "").split(",")]
    if snip:
        out.append(_finding("snippets", "ok", "snippets allowed on " + ", ".join(s.id for s in snip)))
    elif dirs:
        s = next((s for s in dirs if s.id == "local"), dirs[0])
        out.append(_finding("snippets", "warn", "no directory storage of this node allows snippets",
                            f"`pvehook register <vmid> --enable-snippets {s.id}` does it when"
                            " registering"))
    else:
        out.append(_finding("snippets", "warn", "this node has no directory storage for snippets",
                            "pvesm add dir <id> --path <dir> --content snippets"))
    hook = root.path / HOOK_PATH.lstrip("/")
    if hook.is_file() and os.access(hook, os.X_OK):
        out.append(_finding("hook", "ok", f"hook installed: {HOOK_PATH}"))
    else:
        out.append(_finding("hook", "error", f"{HOOK_PATH} is missing or not executable:"
                            " registered VMs cannot start", "install the pvehook package"))
    for vmid, node, volid in registered_vms(root):
        if node != ctx.node:
            continue
        path = _snippet_file(root, storages, volid)
        if path is None or not (path.is_file() and os.access(path, os.X_OK)):
            out.append(_finding("registered", "error",
                                f"VM {vmid} has hookscript {volid}, which is missing on this"
                                " node: the VM cannot start", f"pvehook register {vmid}"))
        else:
            out.append(_finding("registered", "ok", f"VM {vmid}: {volid} ({path})"))
    out.append(_finding("version", "info", f"pvehook {__version__}; snippet name {SNIPPET_NAME}"))
    return out
