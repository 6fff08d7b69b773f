"""`pvehook status`, `iommu`, `check` and `doctor` on a real kernel, compared with sysfs.

The guest script writes each command's JSON and what sysfs itself shows (driver, IOMMU
group members, namespaces by serial) to /results; the comparison is done here.
"""

from __future__ import annotations

import json

from harness import Topology, run_guest

SCRIPT = r"""
set -u
PVEHOOK=${PVEHOOK_CLI:-"python3 -m pvehook.cli"}
mkdir -p /etc/pve/qemu-server
modprobe e1000; modprobe vfio-pci; udevadm settle
A=$VM_BDF_A B=$VM_BDF_B
printf 'hostpci0: %s\n' "$A" > /etc/pve/qemu-server/100.conf
printf 'hostpci0: %s\n' "$B" > /etc/pve/qemu-server/101.conf
# The NIC in B's group is the node's uplink: up, with an address.
NIC_IF=$(for d in $(vm_group $B); do ls /sys/bus/pci/devices/$d/net 2>/dev/null; done)
busybox ip link set "$NIC_IF" up && busybox ip addr add 192.0.2.9/24 dev "$NIC_IF"
mount $(vm_nvme_disk A) /mnt 2>/dev/null || { mkfs.ext4 -q -F $(vm_nvme_disk A) && modprobe ext4 && mount $(vm_nvme_disk A) /mnt; }

# What sysfs says, for the comparison.
for d in /sys/bus/pci/devices/*; do
    a=$(basename $d)
    g=$(basename $(readlink $d/iommu_group))
    drv=$( [ -e $d/driver ] && basename $(readlink $d/driver) || echo null)
    echo "$a $(cat $d/class) $drv $g"
done > /results/sysfs.txt
for c in /sys/class/nvme/nvme*; do
    echo "$(basename $(readlink -f $c/device)) $(tr -d ' ' < $c/serial) $(ls -d $c/nvme*n* 2>/dev/null | xargs -n1 basename | tr '\n' ' ')"
done > /results/nvme.txt

$PVEHOOK status --json > /results/status.json; echo "rc_status=$?"
$PVEHOOK iommu --json > /results/iommu.json; echo "rc_iommu=$?"
$PVEHOOK check 100 --json > /results/check100.json; echo "rc_check100=$?"
$PVEHOOK check 101 --json > /results/check101.json; echo "rc_check101=$?"
$PVEHOOK check 101 > /results/check101.txt 2>&1
$PVEHOOK doctor --json > /results/doctor.json; echo "rc_doctor=$?"
fact_driver() { echo "driver_after_$1=$(vm_driver $2)"; }
fact_driver A $A; fact_driver B $B
exit 0
"""


def test_cli_reports_match_sysfs(vm_workdir):
    topo = Topology().isolated_nvme("A").shared_group_nvme_and_nic("B")
    res = run_guest(SCRIPT, topo, timeout=420, workdir=vm_workdir)
    print(res.output)
    assert res.exit_code == 0, res.output
    r = res.results_dir
    a, b = topo.bdf("A"), topo.bdf("B")
    (nic,) = [d.bdf for d in topo.by_kind("nic")]

    sysfs = {}
    for line in (r / "sysfs.txt").read_text().splitlines():
        addr, cls, drv, group = line.split()
        sysfs[addr] = {"class": int(cls, 16), "driver": None if drv == "null" else drv,
                       "group": int(group)}
    nvme = {}
    for line in (r / "nvme.txt").read_text().splitlines():
        addr, serial, *disks = line.split()
        nvme[addr] = {"serial": serial, "disks": disks}

    # status: every NVMe controller sysfs shows, with its driver, group, serial, disks.
    status = {c["address"]: c for c in json.loads((r / "status.json").read_text())}
    assert set(status) == {x for x, v in sysfs.items() if v["class"] >> 8 == 0x0108}
    for addr, c in status.items():
        assert c["driver"] == sysfs[addr]["driver"]
        assert c["group"] == sysfs[addr]["group"]
        assert c["serial"] == nvme[addr]["serial"]
        assert [n["name"] for n in c["namespaces"]] == nvme[addr]["disks"]
    assert status[a]["vms"] == [100] and status[b]["vms"] == [101]
    assert any("mounted at /mnt" in u for n in status[a]["namespaces"] for u in n["host_use"])
    assert status[a]["ok"] is True and status[b]["ok"] is False

    # iommu: the same groups and members as /sys/kernel/iommu_groups.
    iommu = json.loads((r / "iommu.json").read_text())
    assert iommu["iommu_enabled"] is True
    groups = {g["group"]: sorted(d["address"] for d in g["devices"]) for g in iommu["groups"]}
    expect: dict[int, list[str]] = {}
    for addr, v in sysfs.items():
        expect.setdefault(v["group"], []).append(addr)
    assert groups == {g: sorted(m) for g, m in expect.items()}
    shared = next(g for g in iommu["groups"] if b in [d["address"] for d in g["devices"]])
    assert shared["ok"] is False and nic in shared["verdict"]

    # check: the hook's exit codes, and nothing changed.
    out = res.output
    assert "rc_check100=11" in out  # its disk is mounted
    assert "rc_check101=11" in out  # the uplink NIC shares its group
    check101 = (r / "check101.txt").read_text()
    assert f"{nic} (e1000, class 020000)" in check101
    assert f"driver_after_A={sysfs[a]['driver']}" in out and "driver_after_B=nvme" in out

    # doctor: the IOMMU is on and vfio-pci is there; no Proxmox here, so storage findings
    # may be errors, but the kernel's findings must be right.
    doctor = {f["check"]: f for f in json.loads((r / "doctor.json").read_text())}
    assert doctor["iommu"]["status"] == "ok", doctor
    assert doctor["vfio"]["status"] == "ok", doctor
