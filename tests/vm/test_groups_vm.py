"""Everything qemu-server takes with a VM's IOMMU groups, on a real kernel (issue 12, item 1).

One boot. A pcie-pci-bridge puts an NVMe and an e1000 NIC in one IOMMU group (what
qemu-server binds whole); a second controller joins an NVMe subsystem so that its
namespace is reachable through two controllers (native multipath, item 5). The guest
script prints `key=value` facts read from sysfs, mounts and the hook's exit codes; each
hook run's output is in /results/<name>.log.
"""

from __future__ import annotations

import re

from harness import Topology, run_guest

SCRIPT = r"""
set -u
HOOK=/src/hooks/pvehook-hook
mkdir -p /etc/pve/qemu-server
modprobe nvme; modprobe e1000; modprobe ext4
udevadm settle
fact() { echo "$1=$2"; }
conf() { printf '%b\n' "$2" > /etc/pve/qemu-server/$1.conf; }
run_hook() { local n=$1; shift; "$HOOK" "$@" > /results/$n.log 2>&1; fact rc_$n $?; }
G=$VM_BDF_G1 M=$VM_BDF_M1
IF=$(ls /sys/bus/pci/devices/$NIC/net)
fact nic_if "$IF"
fact group "$(vm_group $G | tr '\n' ' ')"

# 1. The NIC is passed; the NVMe in its group holds a mounted filesystem.
d=$(vm_nvme_disk G1)
mkfs.ext4 -q -F $d && mount $d /mnt && echo data > /mnt/f
conf 100 "hostpci0: ${NIC#0000:}"
run_hook nic_passed 100 pre-start
fact nic_passed_nvme "$(vm_driver $G)"
fact nic_passed_nic "$(vm_driver $NIC)"
fact nic_passed_mounted "$(cat /mnt/f 2>&1)"
umount /mnt

# 2. The NVMe is passed; the NIC in its group is up with an address (the node's uplink).
busybox ip link set "$IF" up && busybox ip addr add 192.0.2.9/24 dev "$IF"
conf 101 "hostpci0: $G"
run_hook uplink 101 pre-start
fact uplink_nvme "$(vm_driver $G)"
fact uplink_nic "$(vm_driver $NIC)"
fact uplink_addr "$(busybox ip -4 addr show dev "$IF" | grep -c 192.0.2.9)"

# 3. The same NIC down without an address: nothing of the host is on it, the NVMe goes.
busybox ip addr flush dev "$IF" && busybox ip link set "$IF" down
run_hook nic_down 101 pre-start
fact nic_down_nvme "$(vm_driver $G)"
# what qemu-server then does with the group, and a QEMU opening the NVMe through VFIO
vm_bind $NIC vfio-pci && fact group_bound yes
vm_vfio_open $G > /results/qmp.txt 2>&1 && fact vfio_open ok || fact vfio_open failed
vm_bind $NIC e1000
run_hook nic_down_post 101 post-stop
fact nic_down_post_nvme "$(vm_driver $G)"

# 4. Native multipath: M1's namespace is also reachable through a second controller.
# (a subsystem's controllers share its serial: the one that is not at $M)
M2=$(for c in /sys/class/nvme/nvme*; do b=$(basename "$(readlink -f $c/device)")
     [ "$(tr -d ' ' < $c/serial)" = M1 ] && [ "$b" != "$M" ] && echo $b; done)
fact m2 "$M2"
ls -l /sys/class/nvme-subsystem/*/ > /results/subsystems.txt
conf 102 "hostpci0: $M"
run_hook mp_one 102 pre-start
fact mp_one_m "$(vm_driver $M)"
conf 103 "hostpci0: $M\nhostpci1: $M2"
run_hook mp_all 103 pre-start
fact mp_all_m "$(vm_driver $M)"
fact mp_all_m2 "$(vm_driver $M2)"
run_hook mp_all_post 103 post-stop
fact mp_post_m "$(vm_driver $M)"
fact mp_post_m2 "$(vm_driver $M2)"
exit 0
"""


def facts(output: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^(\w+)=(.*)$", output, re.M))


def test_group_members_and_multipath(vm_workdir):
    topo = Topology().shared_group_nvme_and_nic("G1").multipath_nvme("M1")
    (nic,) = [d.bdf for d in topo.by_kind("nic")]
    subsys = next(a.split("id=")[1].split(",")[0] for d in topo.devices for a in d.qemu_args
                  if a.startswith("nvme-subsys,"))
    # A second controller of M1's subsystem behind its own root port in the last slot
    # (it takes the highest bus number, so the topology's addresses stay as predicted).
    extra = ["-device", "pcie-root-port,id=rpmp,chassis=30,slot=30,addr=1e.0",
             "-device", f"nvme,id=ctrlmp,serial=M1,subsys={subsys},bus=rpmp"]
    res = run_guest(f"NIC={nic}\n" + SCRIPT, topo, timeout=600, workdir=vm_workdir,
                    extra_qemu_args=extra)
    print(res.output)
    print(f"boot took {res.duration:.1f} s")
    assert res.exit_code == 0, res.output
    f = facts(res.output)
    g, m = topo.bdf("G1"), topo.bdf("M1")

    def log(name):
        return (res.results_dir / f"{name}.log").read_text()

    assert g in f["group"] and nic in f["group"], f["group"]
    out = log("nic_passed")
    assert f["rc_nic_passed"] == "11", out
    assert f"{g} (nvme, class 010802) is in IOMMU group" in out and "is mounted at /mnt" in out
    assert f["nic_passed_nvme"] == "nvme" and f["nic_passed_nic"] == "e1000"
    assert f["nic_passed_mounted"] == "data"

    out = log("uplink")
    assert f["rc_uplink"] == "11", out
    assert f"network interface {f['nic_if']} (up) has the address 192.0.2.9" in out
    assert f["uplink_nvme"] == "nvme" and f["uplink_nic"] == "e1000" and f["uplink_addr"] == "1"

    out = log("nic_down")
    assert f["rc_nic_down"] == "0", out
    assert f"{nic} (e1000, class 020000) shares IOMMU group" in out
    assert f["nic_down_nvme"] == "vfio-pci"
    assert f.get("group_bound") == "yes"
    assert f["vfio_open"] == "ok", (res.results_dir / "qmp.txt").read_text()
    assert f["rc_nic_down_post"] == "0", log("nic_down_post")
    assert f["nic_down_post_nvme"] == "nvme"

    m2 = f["m2"]
    assert re.fullmatch(r"0000:[0-9a-f]{2}:00\.0", m2), (res.results_dir / "subsystems.txt").read_text()
    out = log("mp_one")
    assert f["rc_mp_one"] == "11", out
    assert re.search(rf"{m}: nvme\d+n1 is also reachable through nvme\d+ \({m2}\)", out), out
    assert f["mp_one_m"] == "nvme"
    assert f["rc_mp_all"] == "0", log("mp_all")
    assert f["mp_all_m"] == f["mp_all_m2"] == "vfio-pci"
    assert f["rc_mp_all_post"] == "0", log("mp_all_post")
    assert f["mp_post_m"] == f["mp_post_m2"] == "nvme"
