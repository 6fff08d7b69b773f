"""confirm_volumes on real LVM: a thin pool on an emulated NVMe, real dm devices, mounts
and a volume group the host activated on top of a guest disk. One boot.

The guest calls pvehook.volumes.confirm_volumes through a small driver
(/results/confirm.py) for each scenario and saves (lines, refusals) as JSON; `lvm` is
wrapped to count its calls. The assertions are about what it reported against the real
kernel and lvm2 2.03.
"""

from __future__ import annotations

import json

from harness import Topology, run_guest

CONFIRM_PY = r"""
import json, sys, time
from pvehook.context import Context
from pvehook.paths import Root
from pvehook.vmconfig import VmConfig
from pvehook.volumes import confirm_volumes

def calls():
    try:
        with open("/tmp/lvm-calls") as f:
            return len(f.readlines())
    except FileNotFoundError:
        return 0

name, out = sys.argv[1], {}
for vmid in sys.argv[2:]:
    ctx = Context(root=Root())
    before, t = calls(), time.monotonic()
    lines, refusals = confirm_volumes(ctx, VmConfig.load(ctx.root, int(vmid)))
    out[vmid] = {"lines": lines, "refusals": [str(e) for e in refusals],
                 "codes": [e.exit_code for e in refusals], "lvm_calls": calls() - before,
                 "seconds": round(time.monotonic() - t, 3)}
    for line in lines:
        print(f"[{name} {vmid}] {line}")
    for e in refusals:
        print(f"[{name} {vmid}] REFUSED {e}")
with open(f"/results/{name}.json", "w") as f:
    json.dump(out, f, indent=1)
"""

SCRIPT = r"""
set -u
modprobe dm_mod && modprobe dm_thin_pool && modprobe ext4
udevadm settle
# count the lvm calls of confirm_volumes
mkdir -p /tmp/bin
printf '#!/bin/sh\necho "$*" >> /tmp/lvm-calls\nexec /usr/sbin/lvm "$@"\n' > /tmp/bin/lvm
chmod +x /tmp/bin/lvm
confirm() { PATH=/tmp/bin:$PATH python3 /results/confirm.py "$@"; }
conf() { printf '%b\n' "$2" > /etc/pve/qemu-server/$1.conf; }

D=$(vm_nvme_disk S1)
echo "disk=$D rotational=$(cat /sys/block/${D#/dev/}/queue/rotational)"
pvcreate -q $D && vgcreate -q pve $D
lvcreate -q -L 128M -T pve/data
lvcreate -q -V 64M -T pve/data -n vm-100-disk-0
lvcreate -q -L 8M -n vm-100-disk-1.qcow2 pve   # a PVE 9 qcow2 volume on thick LVM
mkdir -p /etc/pve/qemu-server
printf 'lvmthin: local-lvm\n\tthinpool data\n\tvgname pve\n\tcontent rootdir,images\n\nlvm: thick\n\tvgname pve\n\tcontent images\n' > /etc/pve/storage.cfg

conf 100 "scsi0: local-lvm:vm-100-disk-0,cache=writeback,size=64M"
conf 101 "scsi0: local-lvm:vm-100-disk-0,discard=on,size=128M"
conf 102 "scsi0: local-lvm:vm-102-disk-0,size=32M"
conf 103 "scsi0: thick:vm-100-disk-1.qcow2,size=8M"
conf 104 "scsi0: local-lvm:vm-100-disk-0,discard=on,size=64M"
conf 105 "hostpci0: 0000:01:00.0\nsata0: $D\nide2: none,media=cdrom"
F=vg_name,lv_name,pool_lv,data_lv,segtype,lv_size,lv_active,lv_device_open,lv_kernel_major,lv_kernel_minor,devices
lvm lvs -a --reportformat json --units b --nosuffix -o $F pve > /results/lvs-active.json

confirm active 100 101 102 103 105

lvchange -an pve/vm-100-disk-0
lvm lvs -a --reportformat json --units b --nosuffix -o $F pve > /results/lvs-inactive.json
confirm inactive 104
lvchange -ay pve/vm-100-disk-0

sleep 600 < /dev/pve/vm-100-disk-0 &
P=$!
sleep 0.5
confirm open 104
kill $P; wait $P 2>/dev/null

mkfs.ext4 -q /dev/pve/vm-100-disk-0 && mkdir -p /mnt/x && mount /dev/pve/vm-100-disk-0 /mnt/x
confirm mounted 104
umount /mnt/x

# The host's LVM picks up a PV the guest made on its disk (needs scan_lvs for an LV).
C='devices { scan_lvs=1 }'
wipefs -qa /dev/pve/vm-100-disk-0
lvm pvcreate -q --config "$C" /dev/pve/vm-100-disk-0 &&
    lvm vgcreate -q --config "$C" guestvg /dev/pve/vm-100-disk-0 &&
    lvm lvcreate -q --config "$C" -L 8M -n root guestvg
ls /sys/block/$(basename $(readlink -f /dev/pve/vm-100-disk-0))/holders
confirm stacked 104
lvm vgchange -q --config "$C" -an guestvg
confirm unstacked 104
echo done
"""


def test_lvm_volumes_on_real_lvm(vm_workdir):
    topo = Topology().isolated_nvme("S1", size="512M")
    res = run_guest(SCRIPT, topo, timeout=420, workdir=vm_workdir,
                    files={"confirm.py": CONFIRM_PY})
    print(res.output)
    print(f"boot took {res.duration:.1f} s")
    assert res.exit_code == 0, res.output
    assert "done" in res.output, res.output

    def load(name):
        return json.loads((res.results_dir / f"{name}.json").read_text())

    vol = "scsi0 local-lvm:vm-100-disk-0 -> /dev/pve/vm-100-disk-0: raw, 64 MiB, thin pool pve/data"
    active = load("active")

    # Confirmed, with the two notes: cache=writeback, no discard on an NVMe (rotational 0).
    r = active["100"]
    assert r["refusals"] == [] and r["lvm_calls"] == 1
    assert r["lines"][0] == f"{vol}, not in use"
    assert any(line.startswith("note: scsi0: cache=writeback needs protected power")
               for line in r["lines"])
    assert any(line.startswith("note: scsi0: discard=on is not set, but the volume is on SSD (nvme")
               for line in r["lines"]), r["lines"]

    # size= larger than the LV: a warning, not a refusal.
    r = active["101"]
    assert r["refusals"] == [] and r["lines"][0] == f"{vol}, not in use"
    assert r["lines"][1].startswith("warning: scsi0 local-lvm:vm-100-disk-0: the LV is 64 MiB,"
                                    " smaller than size=128M")

    # LV missing.
    r = active["102"]
    assert r["codes"] == [15] and r["lines"] == []
    assert r["refusals"][0].startswith(
        "scsi0 local-lvm:vm-102-disk-0: /dev/pve/vm-102-disk-0 does not exist")

    # A qcow2 volume on LVM: refused from its name, without asking lvm.
    r = active["103"]
    assert r["codes"] == [15] and r["lvm_calls"] == 0
    assert "a qcow2 volume on LVM storage 'thick', not RAW" in r["refusals"][0]

    # No disk on LVM: nothing to say, and no lvm call.
    assert active["105"] == {**active["105"], "lines": [], "refusals": [], "lvm_calls": 0}

    r = load("inactive")["104"]
    assert r["refusals"] == [] and r["lvm_calls"] == 1
    assert r["lines"] == [f"{vol}, inactive (Proxmox activates it at start)"]

    r = load("open")["104"]
    assert r["codes"] == [15]
    assert "the host uses it: open by a process" in r["refusals"][0]

    r = load("mounted")["104"]
    assert r["codes"] == [15]
    assert "the host uses it: mounted at /mnt/x" in r["refusals"][0]

    r = load("stacked")["104"]
    assert r["codes"] == [15]
    assert "(guestvg-root), an active LVM volume" in r["refusals"][0]

    # Once the host lets go of the guest's VG, the volume is confirmed again.
    r = load("unstacked")["104"]
    assert r["refusals"] == [] and r["lines"] == [f"{vol}, not in use"]

    # lvm2 2.03's JSON: every value a string; an inactive LV has kernel major -1 and
    # lv_device_open "unknown" (not ""), an active unopened one "".
    def rows(name):
        data = json.loads((res.results_dir / name).read_text())
        return {r["lv_name"]: r for rep in data["report"] for r in rep["lv"]}

    a, i = rows("lvs-active.json")["vm-100-disk-0"], rows("lvs-inactive.json")["vm-100-disk-0"]
    assert (a["lv_device_open"], a["pool_lv"], a["lv_size"]) == ("", "data", str(64 << 20))
    assert (i["lv_kernel_major"], i["lv_device_open"], i["lv_active"]) == ("-1", "unknown", "")
    assert rows("lvs-active.json")["[data_tdata]"]["devices"].startswith("/dev/nvme")
