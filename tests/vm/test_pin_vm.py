"""Drive pins on a real kernel (issue 13): two boots of one node with the same disk images,
the second with the two controllers swapped between their slots (a BIOS update, a card
moved), so the serials trade addresses. /var/lib/pvehook goes to /state at the end of the
first boot and comes back at the start of the second, as a node's disk keeps it.

Boot 1: VM 100 (hostpci0 = WD1's address) is pinned at its first start (trust on first
use); VM 101 (SS2's address) with `pvehook pin 101 --accept`. VM 102 (`mapping=` of both
addresses) is refused at its first start: its first free alternative holds VM 100's
pinned drive, which no VM gets on trust; `pvehook pin 102 --accept` pins WD1 for it too. While VM 100 runs, its
controller is on vfio-pci: a second pre-start tells the drive from the identity recorded
on nvme in this boot. The PCIe Device Serial Number reader is compared with lspci on the
real config space of an e1000e (AER at 0x100, DSN after it) and of the NVMe (none).

Boot 2: VM 100's address holds SS2 now: pre-start refuses (exit 18), naming SS2, VM 101
and where WD1 went, and nothing moves (both on nvme, disk contents intact). VM 102's first
alternative holds SS2: refused as well (qemu-server takes the first free one). VM 101,
moved to its drive's new address, runs and reserves that address: VM 102 then gets the
second alternative, its pinned WD1. After `pvehook pin 100 --accept` (through
`python3 -m pvehook.cli`: no pvesh), VM 100 starts with the drive now at its address.
"""

from __future__ import annotations

import json
import re

from harness import Topology, run_guest

COMMON = r"""
set -u
HOOK=${PVEHOOK_HOOK:-/src/hooks/pvehook-hook}
PVEHOOK="python3 -m pvehook.cli"
mkdir -p /etc/pve/qemu-server /etc/pve/mapping /run/qemu-server
modprobe nvme
udevadm settle
fact() { echo "$1=$2"; }
conf() { printf 'hookscript: local:snippets/pvehook-hook\n%b\n' "$2" > /etc/pve/qemu-server/$1.conf; }
run_hook() { local n=$1; shift; "$HOOK" "$@" > /results/$n.log 2>&1; fact rc_$n $?; }
write_marker() { printf '%s' "$2" | dd of=$(vm_nvme_disk $1) bs=512 seek=2048 conv=sync,fsync status=none; }
read_marker() { dd if=$(vm_nvme_disk $1) bs=512 skip=2048 count=1 status=none | tr -d '\0'; }
# The admin's configs name the addresses of the first boot ($OLD_WD1, $OLD_SS2).
conf 100 "hostpci0: $OLD_WD1"
conf 101 "hostpci0: $OLD_SS2"
conf 102 "hostpci0: mapping=disks"
# Map lines as Proxmox writes them (assert_valid compares iommugroup and subsystem-id).
mapline() {
    local d=/sys/bus/pci/devices/$1
    printf '\tmap node=%s,path=%s,id=1b36:0010,iommugroup=%s,subsystem-id=%s:%s\n' "$(uname -n)" "$1" \
        "$(basename "$(readlink $d/iommu_group)")" "$(sed 's/^0x//' $d/subsystem_vendor)" \
        "$(sed 's/^0x//' $d/subsystem_device)"
}
{ echo disks; mapline "$OLD_WD1"; mapline "$OLD_SS2"; } > /etc/pve/mapping/pci.cfg
lspci_dsn() { lspci -vvv -s "$1" | sed -n 's/.*Device Serial Number \(.*\)$/\1/p'; }
py_dsn() { python3 -c "import sys; from pvehook.identity import read_dsn; from pvehook.pci import *; from pvehook.paths import Root; print(read_dsn(PciDevice(Root('/'), PciAddress.parse(sys.argv[1]))) or '')" "$1"; }
"""

BOOT1 = r"""
write_marker WD1 "marker-WD1"
write_marker SS2 "marker-SS2"

run_hook b1_pre100 100 pre-start
fact b1_drv100 "$(vm_driver $VM_BDF_WD1)"
$PVEHOOK status --json > /results/b1_status.json
run_hook b1_pre100_vfio 100 pre-start   # already on vfio-pci: the record of this boot tells
run_hook b1_post100 100 post-stop
fact b1_drv100_after "$(vm_driver $VM_BDF_WD1)"

$PVEHOOK pin 101 --accept > /results/b1_accept101.log 2>&1; fact rc_b1_accept101 $?
run_hook b1_pre102_trust 102 pre-start   # its first alternative holds VM 100's drive
fact b1_drv102_trust "$(vm_driver $VM_BDF_WD1)"
$PVEHOOK pin 102 --accept > /results/b1_accept102.log 2>&1; fact rc_b1_accept102 $?
run_hook b1_pre102 102 pre-start
fact b1_drv102 "$(vm_driver $VM_BDF_WD1)"
run_hook b1_post102 102 post-stop
$PVEHOOK pin 102 --json > /results/b1_pin102.json

fact nic_dsn_lspci "$(lspci_dsn $NIC)"
fact nic_dsn_py "$(py_dsn $NIC)"
fact nvme_dsn_lspci "$(lspci_dsn $VM_BDF_WD1)"
fact nvme_dsn_py "$(py_dsn $VM_BDF_WD1)"

rm -rf /state/pvehook && cp -a /var/lib/pvehook /state/pvehook
fact saved "$(ls /state/pvehook | tr '\n' ' ')"
exit 0
"""

BOOT2 = r"""
fact b2_wd1_at "$VM_BDF_WD1"
fact b2_ss2_at "$VM_BDF_SS2"
mkdir -p /var/lib && cp -a /state/pvehook /var/lib/pvehook
fact b2_store_mode "$(stat -c %a /var/lib/pvehook/pins.json)"
fact b2_dir_mode "$(stat -c %a /var/lib/pvehook)"

run_hook b2_pre100 100 pre-start
fact b2_drv_old_wd1 "$(vm_driver $OLD_WD1)"
fact b2_drv_old_ss2 "$(vm_driver $OLD_SS2)"
fact b2_records "$(ls /run/pvehook/*.json 2>/dev/null | wc -l)"  # locks/ stays
fact b2_marker_wd1 "$(read_marker WD1)"
fact b2_marker_ss2 "$(read_marker SS2)"
$PVEHOOK doctor --json > /results/b2_doctor.json; fact rc_b2_doctor $?
$PVEHOOK pin 100 > /results/b2_pin100.log 2>&1

run_hook b2_pre102 102 pre-start
fact b2_drv102_refused "$(vm_driver $OLD_SS2)"

# VM 101 follows its drive (hostpci0 updated) and runs: qemu-server's reservation of it
conf 101 "hostpci0: $VM_BDF_SS2"
run_hook b2_pre101 101 pre-start
fact b2_drv101 "$(vm_driver $VM_BDF_SS2)"
sleep 600 & QEMU_PID=$!
echo $QEMU_PID > /run/qemu-server/101.pid
echo "$VM_BDF_SS2 101 pid:$QEMU_PID" > /run/qemu-server/pci-id-reservations
run_hook b2_pre102b 102 pre-start
fact b2_drv102 "$(vm_driver $VM_BDF_WD1)"
run_hook b2_post102 102 post-stop
kill $QEMU_PID; rm -f /run/qemu-server/101.pid /run/qemu-server/pci-id-reservations
run_hook b2_post101 101 post-stop

$PVEHOOK pin 100 --accept > /results/b2_accept100.log 2>&1; fact rc_b2_accept100 $?
run_hook b2_pre100b 100 pre-start
fact b2_drv100 "$(vm_driver $OLD_WD1)"
run_hook b2_post100 100 post-stop
fact b2_drv100_after "$(vm_driver $OLD_WD1)"
fact b2_marker_wd1_end "$(read_marker WD1)"
fact b2_marker_ss2_end "$(read_marker SS2)"
exit 0
"""


def facts(output: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^(\w+)=(.*)$", output, re.M))


def boot(script, topo, workdir, state, env, **kw):
    head = "".join(f"export {k}={v}\n" for k, v in env.items())
    res = run_guest(head + COMMON + script, topo, timeout=600, workdir=workdir,
                    state_dir=state, **kw)
    print(res.output)
    print(f"boot took {res.duration:.1f} s")
    assert res.exit_code == 0, res.output
    return res, facts(res.output)


def log(res, name: str) -> str:
    return (res.results_dir / f"{name}.log").read_text()


def test_swapped_slots_across_a_reboot(vm_workdir, tmp_path):
    img_wd, img_ss = tmp_path / "wd1.img", tmp_path / "ss2.img"
    state = tmp_path / "state"
    first = Topology().isolated_nvme("WD1", image=img_wd).isolated_nvme("SS2", image=img_ss)
    second = Topology().isolated_nvme("SS2", image=img_ss).isolated_nvme("WD1", image=img_wd)
    wd, ss = first.bdf("WD1"), first.bdf("SS2")
    assert (second.bdf("SS2"), second.bdf("WD1")) == (wd, ss)  # the serials trade addresses
    env = {"OLD_WD1": wd, "OLD_SS2": ss, "NIC": "0000:00:1d.0"}

    res, f = boot(BOOT1, first, vm_workdir / "boot1", state, env,
                  extra_qemu_args=["-device", "e1000e,addr=1d.0,mac=52:54:00:12:34:56"])
    assert f["rc_b1_pre100"] == "0", log(res, "b1_pre100")
    assert (f"{wd}: pinned QEMU NVMe Ctrl WD1 as the drive of VM 100 hostpci0 (trust on first"
            " use") in log(res, "b1_pre100")
    assert f["b1_drv100"] == "vfio-pci"
    status = {c["address"]: c for c in json.loads((res.results_dir / "b1_status.json").read_text())}
    assert status[wd]["identity"]["serial"] == "WD1"
    assert status[wd]["identity_source"] == "recorded"  # on vfio-pci: no nvme attributes
    assert status[ss]["identity"]["subsysnqn"] == "nqn.2019-08.org.qemu:SS2"
    assert f["rc_b1_pre100_vfio"] == "0", log(res, "b1_pre100_vfio")
    assert (f"{wd}: VM 100's pinned drive QEMU NVMe Ctrl WD1 (as recorded when it was last on"
            " nvme") in log(res, "b1_pre100_vfio")
    assert f["b1_drv100_after"] == "nvme"
    assert f["rc_b1_accept101"] == "0", log(res, "b1_accept101")
    assert f["rc_b1_pre102_trust"] == "18", log(res, "b1_pre102_trust")
    assert ("the pinned drive of VM 100 (hostpci0); hostpci0 of VM 102 has no pinned drive yet,"
            " and pvehook does not give another VM's drive on trust") in log(res, "b1_pre102_trust")
    assert f["b1_drv102_trust"] == "nvme"
    assert f["rc_b1_accept102"] == "0", log(res, "b1_accept102")
    assert "also the pinned drive of VM 100 (hostpci0)" in log(res, "b1_accept102")
    assert f["rc_b1_pre102"] == "0" and f["b1_drv102"] == "vfio-pci", log(res, "b1_pre102")
    pin102 = json.loads((res.results_dir / "b1_pin102.json").read_text())
    assert pin102["pinned"][0]["identity"]["serial"] == "WD1"
    # the DSN reader agrees with lspci on a real config space, with and without a DSN
    assert f["nic_dsn_py"] == f["nic_dsn_lspci"] != ""
    assert f["nvme_dsn_py"] == f["nvme_dsn_lspci"] == ""
    assert "pins.json" in f["saved"]

    res, f = boot(BOOT2, second, vm_workdir / "boot2", state, env)
    assert (f["b2_ss2_at"], f["b2_wd1_at"]) == (wd, ss)
    assert (f["b2_store_mode"], f["b2_dir_mode"]) == ("600", "700")
    # refused before anything moved
    assert f["rc_b2_pre100"] == "18", log(res, "b2_pre100")
    assert (f"error: {wd} now holds QEMU NVMe Ctrl SS2, the pinned drive of VM 101 (hostpci0)"
            f" (not VM 100's QEMU NVMe Ctrl WD1); that drive is at {ss}; update hostpci0, or"
            f" run `pvehook pin 100 --accept` to accept the drive at {wd}") in log(res, "b2_pre100")
    assert f["b2_drv_old_wd1"] == f["b2_drv_old_ss2"] == "nvme"
    assert f["b2_records"] == "0"
    assert (f["b2_marker_wd1"], f["b2_marker_ss2"]) == ("marker-WD1", "marker-SS2")
    doctor = json.loads((res.results_dir / "b2_doctor.json").read_text())
    moved = [d["message"] for d in doctor if d["check"] == "pins" and d["status"] == "error"]
    assert any(m.startswith(f"VM 100 hostpci0: its pinned drive QEMU NVMe Ctrl WD1 moved to {ss}")
               for m in moved), doctor
    assert f["rc_b2_doctor"] == "9"
    fixes = {d["message"].split(":")[0]: d["fix"] for d in doctor if d["check"] == "pins"}
    assert fixes["VM 102 hostpci0"].startswith("put its map line first in mapping 'disks'")
    assert f"now: {ss} (moved)" in log(res, "b2_pin100")
    # mapping=: the first free alternative holds SS2 now; qemu-server would take it
    assert f["rc_b2_pre102"] == "18", log(res, "b2_pre102")
    assert f"that drive is at {ss}, alternative 2 of mapping 'disks'" in log(res, "b2_pre102")
    assert f["b2_drv102_refused"] == "nvme"
    # with the first alternative held by running VM 101, the start takes the pinned second one
    assert f["rc_b2_pre101"] == "0" and f["b2_drv101"] == "vfio-pci", log(res, "b2_pre101")
    assert f["rc_b2_pre102b"] == "0", log(res, "b2_pre102b")
    assert f"{ss}: VM 102's pinned drive QEMU NVMe Ctrl WD1" in log(res, "b2_pre102b")
    assert f["b2_drv102"] == "vfio-pci"
    assert f["rc_b2_post102"] == f["rc_b2_post101"] == "0"
    # accepted: VM 100 starts with the drive at its address now
    assert f["rc_b2_accept100"] == "0", log(res, "b2_accept100")
    assert (f"VM 100 hostpci0: pinned QEMU NVMe Ctrl SS2 at {wd} (was QEMU NVMe Ctrl WD1)"
            in log(res, "b2_accept100"))
    assert f["rc_b2_pre100b"] == "0", log(res, "b2_pre100b")
    assert f["b2_drv100"] == "vfio-pci" and f["b2_drv100_after"] == "nvme"
    assert (f["b2_marker_wd1_end"], f["b2_marker_ss2_end"]) == ("marker-WD1", "marker-SS2")
