"""Are the VM's disks on LVM storages RAW volumes that nothing on the host uses?

For every disk on an `lvm`/`lvmthin` storage of /etc/pve/storage.cfg: the LV exists in
the storage's volume group (and thin pool), it is RAW, nothing has it open, mounted or
stacked on it (the host's LVM activating the guest's own volume group on it, kpartx
partitions), and it is at least as large as the config's `size=`. An inactive LV is fine:
Proxmox activates it after pre-start. Pure reads; one `lvm lvs` for all volumes, and none
at all for a VM without LVM disks (the hook runs at every start).
"""

from __future__ import annotations

import os
import re
from collections import namedtuple
from pathlib import Path

from .block import BlockDevice
from .context import Context
from .errors import ConfigError, PvehookError, VolumeError
from .storagecfg import LVM_TYPES, LvmVolume, load_storage_cfg, lvm_volume
from .units import human_size, parse_size
from .vmconfig import Disk, VmConfig

# Everything read from `lvm lvs`; -a adds the hidden LVs ([data_tdata]) under a thin pool,
# so that the physical volumes below a thin LV can be found. `devices` is a segment
# field: a LV with several segments gives several rows.
LVS_FIELDS = ("vg_name,lv_name,pool_lv,data_lv,segtype,lv_size,lv_device_open,"
              "lv_kernel_major,lv_kernel_minor,devices")

_DEVICE_RE = re.compile(r"^(.*)\((\d+)\)$")  # "/dev/sda3(0)", "data_tdata(0)"


class _Lv(namedtuple("_Lv", "row devices")):
    """One LV of the report (its segments' rows merged)."""

    __slots__ = ()

    def get(self, key: str) -> str:
        return str(self.row.get(key) or "")

    @property
    def active(self) -> bool:
        return self.get("lv_kernel_major") not in ("", "-1")

    @property
    def devnum(self) -> str:
        return f"{self.get('lv_kernel_major')}:{self.get('lv_kernel_minor')}"


def _merge(rows: list[dict]) -> dict[tuple[str, str], _Lv]:
    lvs: dict[tuple[str, str], _Lv] = {}
    for row in rows:
        key = (str(row.get("vg_name", "")), str(row.get("lv_name", "")))
        lv = lvs.setdefault(key, _Lv(row, []))
        for dev in str(row.get("devices") or "").split(","):
            if dev and dev not in lv.devices:
                lv.devices.append(dev)
    return lvs


def _pv_paths(lvs: dict[tuple[str, str], _Lv], vg: str, lv: _Lv) -> list[str]:
    """The physical volumes under an LV, through thin pools and hidden sub-LVs."""
    out: list[str] = []
    seen: set[str] = set()
    todo = [lv]
    while todo:
        cur = todo.pop()
        if cur.get("lv_name") in seen:
            continue
        seen.add(cur.get("lv_name"))
        names = [m[1] if (m := _DEVICE_RE.match(d)) else d for d in cur.devices]
        if cur.get("pool_lv"):
            names.append(cur.get("pool_lv"))
        if cur.get("data_lv"):
            names.append(cur.get("data_lv"))
        for name in names:
            if name.startswith("/"):
                if name not in out:
                    out.append(name)
                continue
            bare = name.strip("[]")
            sub = lvs.get((vg, bare)) or lvs.get((vg, f"[{bare}]"))
            if sub is not None:
                todo.append(sub)
            else:
                out.append(name)  # "[unknown]" for a missing PV
    return out


def _rotational(ctx: Context, pv_path: str) -> tuple[str, bool | None]:
    """(kernel name, rotational) of a PV given by its /dev path; None when not known."""
    if not pv_path.startswith("/dev/"):
        return pv_path, None
    name = os.path.basename(os.path.realpath(ctx.root.dev(pv_path[len("/dev/"):])))
    try:
        dev = BlockDevice.by_name(ctx.root, name)
        queue = (dev.sys_path.parent if dev.is_partition else dev.sys_path) / "queue"
        return name, (queue / "rotational").read_text().strip() == "1"
    except OSError:
        return name, None


def _host_use(ctx: Context, lv: _Lv, vol: LvmVolume) -> tuple[list[str], BlockDevice | None]:
    """Why the host uses this active LV (empty: it does not), and its dm device: the
    same check as for a disk (usage.stack_use), plus LVM's own open count."""
    from .usage import mounts, stack_use, swaps

    link = ctx.root.sys("dev", "block", lv.devnum)
    if not link.exists():
        return [f"LVM reports it active as {lv.devnum}, but there is no such device in sysfs"], None
    dm = BlockDevice(ctx.root, Path(os.path.realpath(link)).name, Path(os.path.realpath(link)))
    names = (vol.dev_path, *([f"/dev/mapper/{dm.dm_name}"] if dm.dm_name else []))
    uses, _stack = stack_use(dm, mounts(ctx.root), swaps(ctx.root), names)
    # "mounted at /srv", "active swap": the message already names the volume
    reasons = [u[len("is "):] if u.startswith("is ") else u for u in uses]
    if not reasons and lv.get("lv_device_open") == "open":
        reasons.append("open by a process (another VM's QEMU, a backup, dd...)")
    return reasons, dm


def _check(ctx: Context, config: VmConfig, disk: Disk, vol: LvmVolume,
           lvs: dict[tuple[str, str], _Lv], lines: list[str], refusals: list[PvehookError],
           vg_errors: dict[str, str]) -> None:
    what = f"{disk.key} {disk.volume}"
    lv = lvs.get((vol.vg, vol.lv))
    if lv is None:
        if vol.vg in vg_errors:
            refusals.append(VolumeError(
                f"{what}: volume group {vol.vg!r} of storage {vol.storage!r} is not available"
                f" on this node ({vg_errors[vol.vg]})",
                hint=f"check `vgs {vol.vg}` and the storage's vgname in /etc/pve/storage.cfg"))
        else:
            refusals.append(VolumeError(
                f"{what}: {vol.dev_path} does not exist (no LV {vol.lv!r} in volume group"
                f" {vol.vg!r})",
                hint=f"check `lvs {vol.vg}`; restore the volume or correct {disk.key} in"
                     f" {config.source or f'qemu-server/{config.vmid}.conf'}"))
        return
    pool = lv.get("pool_lv")
    if vol.thinpool and pool != vol.thinpool:
        refusals.append(VolumeError(
            f"{what}: {vol.vg}/{vol.lv} is not a thin volume of the storage's pool"
            f" {vol.vg}/{vol.thinpool} ({f'it is in pool {pool}' if pool else 'it is not thin'})",
            hint=f"check `lvs {vol.vg}` and the storage's thinpool in /etc/pve/storage.cfg"))
        return
    size = int(lv.get("lv_size") or 0)
    if lv.active:
        reasons, _dm = _host_use(ctx, lv, vol)
        if reasons:
            refusals.append(VolumeError(
                f"{what} ({vol.dev_path}): the host uses it: " + "; ".join(reasons),
                hint="stop that use first (umount; `vgchange -an <vg>` for a volume group"
                     " the host activated on it; `kpartx -d`; `fuser -vm` finds a process)"))
            return
        state = "not in use"
    else:
        state = "inactive (Proxmox activates it at start)"
    where = f"thin pool {vol.vg}/{pool}" if pool else f"volume group {vol.vg}"
    lines.append(f"{what} -> {vol.dev_path}: raw, {human_size(size)}, {where}, {state}")

    if "size" in disk.options:
        want = parse_size(disk.options["size"])
        if want is None:
            lines.append(f"warning: {what}: cannot read size={disk.options['size']}")
        elif size < want:
            lines.append(
                f"warning: {what}: the LV is {human_size(size)}, smaller than"
                f" size={disk.options['size']} in the VM config (the guest sees"
                f" {human_size(size)}; `qm disk rescan --vmid {config.vmid}` corrects size=)")
    if disk.options.get("cache") == "writeback":
        lines.append(
            f"note: {disk.key}: cache=writeback needs protected power (UPS, or an SSD with"
            " power-loss protection): a power loss can lose writes the guest believes are on"
            " disk")
    # efidisk0 and tpmstate0 have no discard option (qemu-server Drive.pm).
    if disk.options.get("discard") != "on" and disk.key not in ("efidisk0", "tpmstate0"):
        pvs = [_rotational(ctx, p) for p in _pv_paths(lvs, vol.vg, lv)]
        if pvs and all(rot is False for _, rot in pvs):
            trim = " and the thin pool keeps the freed space" if pool else ""
            lines.append(
                f"note: {disk.key}: discard=on is not set, but the volume is on SSD"
                f" ({', '.join(n for n, _ in pvs)}): the guest's TRIM does not reach the disk"
                f"{trim}")


def confirm_volumes(ctx: Context, config: VmConfig) -> tuple[list[str], list[PvehookError]]:
    """(lines, refusals) for the VM's disks on lvm/lvmthin storages; changes nothing.

    One line per confirmed disk, plus warning/note lines; one VolumeError per disk that
    cannot be confirmed (no LV, not RAW, used by the host).
    """
    lines: list[str] = []
    refusals: list[PvehookError] = []
    disks = [d for d in config.disks
             if not d.is_cdrom and not d.is_cloudinit and d.storage is not None]
    if not disks:
        return lines, refusals
    try:
        storages = load_storage_cfg(ctx.root)
    except ConfigError as e:
        return lines, [e]
    todo: list[tuple[Disk, LvmVolume]] = []
    for disk in disks:
        storage = storages.get(disk.storage or "")
        if storage is None:
            lines.append(f"{disk.key} {disk.volume}: storage {disk.storage!r} is not in"
                         " storage.cfg, not checked")
            continue
        if storage.type not in LVM_TYPES:
            continue
        try:
            vol = lvm_volume(storages, disk)
        except ConfigError as e:
            refusals.append(VolumeError(str(e), hint="Proxmox cannot start this disk either"))
            continue
        if vol is None:
            continue
        what = f"{disk.key} {disk.volume}"
        if vol.format != "raw":
            refusals.append(VolumeError(
                f"{what}: a {vol.format} volume on LVM storage {vol.storage!r}, not RAW",
                hint=f"convert it: `qm disk move {config.vmid} {disk.key} {vol.storage}"
                     " --format raw`"))
            continue
        fmt = disk.options.get("format")
        if fmt is not None and fmt != "raw":
            refusals.append(VolumeError(
                f"{what}: format={fmt} in the VM config, but the LV {vol.dev_path} is RAW",
                hint=f"remove format={fmt} from {disk.key} (LVM volumes are raw)"))
            continue
        todo.append((disk, vol))
    if not todo:
        return lines, refusals

    from . import lvm  # only for VMs with disks on LVM: runs a subprocess

    vgs = sorted({vol.vg for _, vol in todo})
    try:
        rep = lvm.report_partial("lvs", LVS_FIELDS, "-a", *vgs)
    except OSError as e:
        for disk, vol in todo:
            refusals.append(VolumeError(
                f"{disk.key} {disk.volume}: cannot run lvm to check {vol.dev_path}:"
                f" {e.strerror or e}", hint="is lvm2 installed?"))
        return lines, refusals
    lvs = _merge(rep.rows)
    found_vgs = {vg for vg, _ in lvs}
    vg_errors: dict[str, str] = {}
    for vg in vgs:
        msgs = [m for m in rep.errors if f'"{vg}"' in m or f" {vg}" in m]
        if vg not in found_vgs and (msgs or rep.returncode != 0):
            vg_errors[vg] = (msgs or rep.errors or [f"lvm exited with {rep.returncode}"])[0]
    for disk, vol in todo:
        _check(ctx, config, disk, vol, lvs, lines, refusals, vg_errors)
    return lines, refusals
