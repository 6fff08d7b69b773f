"""`pvehook doctor`: is this node ready for passthrough? Each finding with what to do."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import click

from .. import __version__
from .. import iommu as iommu_groups
from ..context import Context
from ..errors import ConfigError, NodeNotReadyError, PvehookError
from ..paths import HOOK_PATH, Root
from ..pci import PciDevice
from ..pins import doctor_findings
from ..storagecfg import DIR_TYPES, load_storage_cfg
from .configs import SNIPPET_NAME, context, read_or_none, registered_vms
from .entry import cli, emit_json, json_option

def _finding(check: str, status: str, message: str, fix: str | None = None) -> dict:
    return {"check": check, "status": status, "message": message, "fix": fix}


def _cpu_vendor(root: Root) -> str:
    text = read_or_none(root.proc("cpuinfo")) or ""
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
        for n, line in enumerate((read_or_none(d / f) or "").splitlines(), 1):
            m = _VFIO_IDS_RE.match(line)
            if not m:
                continue
            for opt in m[1].split():
                if opt.startswith("ids="):
                    out += [(f"/etc/modprobe.d/{f} line {n}", i.lower())
                            for i in opt[4:].split(",") if i]
    for tok in (read_or_none(root.proc("cmdline")) or "").split():
        if tok.startswith(("vfio-pci.ids=", "vfio_pci.ids=")):
            out += [("the kernel command line", i.lower())
                    for i in tok.partition("=")[2].split(",") if i]
    return out


def _snippet_file(root: Root, storages, volid: str) -> Path | None:
    """Where Proxmox finds a snippet: `pvesm path` when there, else storage.cfg."""
    if shutil.which("pvesm"):
        from .api import pvesm_path

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
    cmdline = (read_or_none(root.proc("cmdline")) or "").split()
    iommu_args = [t for t in cmdline if t.split("=")[0] in ("intel_iommu", "amd_iommu", "iommu")]
    vendor = _cpu_vendor(root)
    boot_fix = ("add it to the kernel command line (/etc/kernel/cmdline with systemd-boot, then"
                " proxmox-boot-tool refresh; or GRUB_CMDLINE_LINUX_DEFAULT in /etc/default/grub,"
                " then update-grub) and reboot")
    if iommu_groups.iommu_enabled(root):
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
    interrupts = read_or_none(root.proc("interrupts"))
    unsafe = read_or_none(root.sys("module", "vfio_iommu_type1", "parameters", "allow_unsafe_interrupts"))
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
    release = read_or_none(root.proc("sys", "kernel", "osrelease")) or os.uname().release
    moddir = root.path / "lib" / "modules" / release
    if root.sys("bus", "pci", "drivers", "vfio-pci").is_dir() or root.sys("module", "vfio_pci").is_dir():
        out.append(_finding("vfio", "ok", "vfio-pci is loaded"))
    elif any("vfio-pci.ko" in (read_or_none(moddir / f) or "") for f in ("modules.builtin", "modules.dep")):
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

    dirs = [s for s in storages.values() if s.type in DIR_TYPES and s.on_node(ctx.node)]
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
    local = [vmid for vmid, node, _volid in registered_vms(root) if node == ctx.node]
    for status, message, fix in doctor_findings(ctx, local):
        out.append(_finding("pins", status, message, fix))
    out.append(_finding("version", "info", f"pvehook {__version__}; snippet name {SNIPPET_NAME}"))
    return out


@cli.command(epilog="\b\nExample:\n  pvehook doctor --json")
@json_option
@click.pass_context
def doctor(cctx, as_json):
    """Is this node ready? IOMMU, interrupt remapping, vfio, snippets, registrations."""
    data = doctor_data(context())
    errors = [f for f in data if f["status"] == "error"]
    if as_json:
        emit_json(data)
    else:
        for f in data:
            click.echo(f"[{f['status']:5}] {f['check']}: {f['message']}")
            if f["fix"] and f["status"] != "ok":
                click.echo(f"        fix: {f['fix']}")
    if errors:
        raise NodeNotReadyError(f"{len(errors)} problem(s) found: "
                                + "; ".join(f["check"] for f in errors),
                                hint="see the fixes above")
    cctx.exit(0)
