"""LVM, through its own JSON reports (never columns by position).

post-stop: when nvme takes a disk back, udev's LVM rules autoactivate the guest's volume
groups on it (69-lvm.rules: pvscan --cache ... then vgchange -aay, directly or through a
transient systemd unit lvm-activate-<vg>). Left active, the host now uses the guest's disk
and the next pre-start refuses. So we let that activation finish, then undo it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from .block import BlockDevice
from .paths import Root


def report(cmd: str, fields: str, *args: str) -> list[dict]:
    """Rows of `lvm <cmd> --reportformat json -o <fields>`."""
    out = subprocess.run(
        ["lvm", cmd, "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields, *args],
        check=True, capture_output=True, text=True,
    ).stdout
    data = json.loads(out)
    key = {"pvs": "pv", "vgs": "vg", "lvs": "lv"}[cmd]
    return [row for rep in data.get("report", []) for row in rep.get(key, [])]


def _settle(root: Root, vgs: set[str]) -> None:
    # Every queued udev event has run its RUN programs (the direct vgchange -aay) ...
    subprocess.run(["udevadm", "settle", "--timeout=30"], check=False)
    if not os.path.isdir("/run/systemd/system"):
        return
    # ... and the transient units those programs started have finished. systemd offers
    # no "wait until this unit is gone", so look every 50 ms, for at most 30 s.
    deadline = time.monotonic() + 30
    for vg in vgs:
        while time.monotonic() < deadline:
            state = subprocess.run(
                ["systemctl", "show", "--property=ActiveState", "--value", f"lvm-activate-{vg}"],
                check=False, capture_output=True, text=True,
            ).stdout.strip()
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
        subprocess.run(["lvm", "vgchange", "--activate", "n", vg],
                       check=True, capture_output=True, text=True)
    return sorted(active)
