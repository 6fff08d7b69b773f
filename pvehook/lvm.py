"""LVM, through its own JSON reports (never columns by position).

post-stop: when nvme takes a disk back, udev's LVM rules autoactivate the guest's volume
groups on it (69-lvm.rules: pvscan --cache ... then vgchange -aay, directly or through a
transient systemd unit lvm-activate-<vg>). Left active, the host now uses the guest's disk
and the next pre-start refuses. So we let that activation finish, then undo it.
"""

from __future__ import annotations

import json
import os
import time
from collections import namedtuple

from .block import BlockDevice
from .paths import Root


def _run(argv: list[str], check: bool, env: dict | None = None):
    """Run a command, its output captured as text. subprocess (with threading, signal and
    selectors: ~6 ms) loads on the first command, not with this module: post-stop loads
    it for every disk it gives back but runs a command only for LVM members."""
    import subprocess

    return subprocess.run(argv, check=check, capture_output=True, text=True, env=env)


def report(cmd: str, fields: str, *args: str) -> list[dict]:
    """Rows of `lvm <cmd> --reportformat json -o <fields>`; OSError when lvm fails."""
    proc = _run(["lvm", cmd, "--reportformat", "json", "--units", "b", "--nosuffix", "-o",
                 fields, *args], check=False)
    if proc.returncode != 0:
        raise OSError(f"lvm {cmd} exited with {proc.returncode}: {' '.join(proc.stderr.split())}")
    try:
        data = json.loads(proc.stdout)
    except ValueError as e:
        raise OSError(f"lvm {cmd} printed no JSON report: {e}") from None
    key = {"pvs": "pv", "vgs": "vg", "lvs": "lv"}[cmd]
    return [row for rep in data.get("report", []) for row in rep.get(key, [])]


def _settle(root: Root, vgs: set[str]) -> None:
    # Every queued udev event has run its RUN programs (the direct vgchange -aay) ...
    _run(["udevadm", "settle", "--timeout=30"], check=False)
    if not root.run("systemd", "system").is_dir():
        return
    # ... and the transient units those programs started have finished. systemd offers
    # no "wait until this unit is gone", so look every 50 ms, for at most 30 s.
    deadline = time.monotonic() + 30
    for vg in vgs:
        while time.monotonic() < deadline:
            state = _run(["systemctl", "show", "--property=ActiveState", "--value",
                          f"lvm-activate-{vg}"], check=False).stdout.strip()
            if state not in ("active", "activating", "reloading", "deactivating"):
                break
            time.sleep(0.05)


def run(argv: list[str]):
    """Run a command that must succeed (vgchange, mdadm --stop); an OSError with the
    command's own message when it fails."""
    proc = _run(argv, check=False)
    if proc.returncode != 0:
        why = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
        raise OSError(f"{' '.join(argv[:2])}: {why}")
    return proc


def pv_kernel_name(pv_name: str) -> str:
    """/dev/nvme0n1p1 -> nvme0n1p1; /dev/mapper/x -> dm-N (what /sys/class/block names)."""
    return os.path.basename(os.path.realpath(pv_name))


def _members(disks: list[BlockDevice]) -> list[BlockDevice]:
    return [b for d in disks for b in (d, *d.partitions())]


def _guest_pvs(disks: list[BlockDevice]) -> list[str]:
    return sorted(f"/dev/{b.name}" for b in _members(disks)
                  if (b.udev() or {}).get("ID_FS_TYPE") == "LVM2_member")


def deactivate_guest_vgs(root: Root, disks: list[BlockDevice]) -> list[str]:
    """Deactivate volume groups the host activated on these disks; return their names.

    By VG uuid, never by name: a guest's VG may be named like one of the host's (a
    Proxmox VE guest has its own `pve`), and LVM refuses a name two VGs share.
    """
    lvm_pvs = _guest_pvs(disks)
    if not lvm_pvs:
        return []
    rows = report("pvs", "pv_name,vg_name,vg_uuid", *lvm_pvs)
    vgs = {r["vg_uuid"]: r["vg_name"] for r in rows if r.get("vg_uuid")}
    if not vgs:
        return []
    _settle(root, set(vgs.values()))
    select = " || ".join(f"vg_uuid={u}" for u in sorted(vgs))
    active = {r["vg_uuid"] for r in report("lvs", "vg_uuid,lv_active", "--select", select)
              if r.get("lv_active") == "active"}
    for uuid in sorted(active):
        run(["lvm", "vgchange", "--activate", "n", "--select", f"vg_uuid={uuid}"])
    return sorted(vgs[u] for u in active)


def name_clashes(disks: list[BlockDevice]) -> list[tuple[str, list[str]]]:
    """Volume groups on these (guest) disks named like a VG elsewhere on the host:
    (name, the other VG's PVs). While such a disk is on the host, LVM commands that
    name that VG refuse ("Multiple VGs found with the same name")."""
    guest_pvs = _guest_pvs(disks)
    if not guest_pvs:
        return []
    rows = report("pvs", "pv_name,vg_name,vg_uuid")
    ours = {pv_kernel_name(p) for p in guest_pvs}
    guest = {r["vg_uuid"]: r["vg_name"] for r in rows
             if r.get("vg_uuid") and pv_kernel_name(r["pv_name"]) in ours}
    out = []
    for uuid, name in sorted(guest.items(), key=lambda kv: kv[1]):
        others = sorted(r["pv_name"] for r in rows
                        if r.get("vg_name") == name and r.get("vg_uuid") not in guest)
        if others:
            out.append((name, others))
    return out


class Report(namedtuple("Report", "rows errors returncode")):
    """What one lvm report command printed, also when it failed for part of its args:
    `rows`, `errors` (LVM's own messages: its JSON "log", else stderr), `returncode`."""

    __slots__ = ()


def report_partial(cmd: str, fields: str, *args: str) -> Report:
    """`lvm <cmd> --reportformat json -o <fields> <args>`, never raising on LVM's exit code.

    Given several VG names of which one does not exist, lvm2 2.03 exits 5 but still
    prints the rows of the others, and the failure as `log` entries
    ({"log_type": "error", "log_object_name": ..., "log_message": ...}) beside `report`.
    Raises OSError when `lvm` cannot be run at all.
    """
    proc = _run(["lvm", cmd, "--reportformat", "json", "--units", "b", "--nosuffix", "-o",
                 fields, *args], check=False,
                env={**os.environ, "LC_ALL": "C", "LVM_SUPPRESS_FD_WARNINGS": "1"})
    key = {"pvs": "pv", "vgs": "vg", "lvs": "lv"}[cmd]
    stderr = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        return Report([], stderr or [f"lvm {cmd} exited with {proc.returncode}"], proc.returncode)
    rows = [row for rep in data.get("report", []) for row in rep.get(key, [])]
    errors = [e.get("log_message", "") for e in data.get("log", []) if e.get("log_type") == "error"]
    if proc.returncode != 0 and not errors:
        errors = stderr or [f"lvm {cmd} exited with {proc.returncode}"]
    return Report(rows, errors, proc.returncode)
