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


def deactivate_guest_vgs(root: Root, disks: list[BlockDevice]) -> list[str]:
    """Deactivate volume groups the host activated on these disks; return their names."""
    members = [b for d in disks for b in (d, *d.partitions())]
    lvm_pvs = {f"/dev/{b.name}" for b in members
               if (b.udev() or {}).get("ID_FS_TYPE") == "LVM2_member"}
    if not lvm_pvs:
        return []
    rows = report("pvs", "pv_name,vg_name", *sorted(lvm_pvs))
    vgs = {r["vg_name"] for r in rows if r.get("vg_name")}
    if not vgs:
        return []
    _settle(root, vgs)
    active = {r["vg_name"] for r in report("lvs", "vg_name,lv_active", *sorted(vgs))
              if r.get("lv_active") == "active"}
    for vg in sorted(active):
        proc = _run(["lvm", "vgchange", "--activate", "n", vg], check=False)
        if proc.returncode != 0:
            raise OSError(f"vgchange -an {vg}: {' '.join(proc.stderr.split())}")
    return sorted(active)


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
