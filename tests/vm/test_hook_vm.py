"""The hookscript on a real kernel: real nvme and vfio-pci drivers, IOMMU groups, udev.

Each test is one boot with several scenarios; the guest script prints `key=value` facts
read from sysfs, the disks and the hook's exit codes, and saves each hook run's output
to /results/<name>.log. The assertions are about what the guest's kernel shows.

PVEHOOK_HOOK (in the guest) picks the hook to run: the source tree's by default, the
installed package's when the .deb tests set it.
"""

from __future__ import annotations

import os
import re

from harness import Topology, run_guest

PRELUDE = r"""
set -u
HOOK=${PVEHOOK_HOOK:-/src/hooks/pvehook-hook}
mkdir -p /etc/pve/qemu-server /etc/pve/mapping
modprobe nvme
udevadm settle
fact() { echo "$1=$2"; }
conf() { printf '%b\n' "$2" > /etc/pve/qemu-server/$1.conf; }
# run_hook NAME VMID PHASE: output to /results/NAME.log, exit code as fact rc_NAME
run_hook() { local n=$1; shift; "$HOOK" "$@" > /results/$n.log 2>&1; fact rc_$n $?; }
override() { cat /sys/bus/pci/devices/$1/driver_override; }
# write_marker SERIAL TEXT / read_marker SERIAL: 512 bytes at sector 2048 of the namespace
write_marker() { printf '%s' "$2" | dd of=$(vm_nvme_disk $1) bs=512 seek=2048 conv=sync,fsync status=none; }
read_marker() { dd if=$(vm_nvme_disk $1) bs=512 skip=2048 count=1 status=none | tr -d '\0'; }
"""


def facts(output: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^(\w+)=(.*)$", output, re.M))


def guest(script: str, topo: Topology, workdir, timeout: float = 420):
    env = ""
    if os.environ.get("PVEHOOK_GUEST_HOOK"):
        env = f"export PVEHOOK_HOOK={os.environ['PVEHOOK_GUEST_HOOK']}\n"
    res = run_guest(env + PRELUDE + script, topo, timeout=timeout, workdir=workdir)
    print(res.output)
    print(f"boot took {res.duration:.1f} s")
    assert res.exit_code == 0, res.output
    return res, facts(res.output)


def log(res, name: str) -> str:
    return (res.results_dir / f"{name}.log").read_text()


LIFECYCLE = r"""
S1=$VM_BDF_S1 S2=$VM_BDF_S2 S3=$VM_BDF_S3 S4=$VM_BDF_S4

# Assign and give back, with a nested QEMU opening the device through VFIO in between.
write_marker S1 "marker-S1-$$"
fact marker_written "marker-S1-$$"
conf 100 "memory: 1024\nmachine: q35\nhostpci0: ${S1#0000:},pcie=1\nscsihw: virtio-scsi-pci"
run_hook pre 100 pre-start
fact drv_after_pre "$(vm_driver $S1)"
fact override_after_pre "$(override $S1)"
vm_vfio_open $S1 > /results/qmp.txt 2>&1 && fact vfio_open ok || fact vfio_open failed

# Identical twins: S2 has the same vendor:device. Unbound and reprobed, it goes to nvme.
echo $S2 > /sys/bus/pci/devices/$S2/driver/unbind
echo $S2 > /sys/bus/pci/drivers_probe
fact twin_driver "$(vm_driver $S2)"

run_hook post 100 post-stop
fact drv_after_post "$(vm_driver $S1)"
fact override_after_post "$(override $S1)"
fact disk_after_post "$(vm_nvme_disk S1)"
fact serial_after_post "$(udevadm info --query=property --property=ID_SERIAL --value $(vm_nvme_disk S1))"
fact marker_read "$(read_marker S1)"
run_hook post_again 100 post-stop
fact drv_after_post_again "$(vm_driver $S1)"
fact record_left "$(ls /run/pvehook/*.json 2>/dev/null | wc -l)"  # locks/ stays

# A shared IOMMU group: the NIC next to the NVMe is bound to e1000 and is the node's
# uplink (up, with an address); qemu-server would bind it with the NVMe's group.
modprobe e1000
udevadm settle
NIC_IF=$(ls /sys/bus/pci/devices/$VM_NIC/net)
busybox ip link set "$NIC_IF" up && busybox ip addr add 192.0.2.9/24 dev "$NIC_IF"
write_marker S3 "marker-S3"
conf 101 "hostpci0: $S3"
run_hook shared 101 pre-start
fact shared_driver "$(vm_driver $S3)"
fact shared_nic_driver "$(vm_driver $VM_NIC)"
fact shared_marker "$(read_marker S3)"

# mapping= through /etc/pve/mapping/pci.cfg, for this node's name.
# The map line as Proxmox writes it: what assert_valid compares with the device.
sub() { sed 's/^0x//' /sys/bus/pci/devices/$1/subsystem_$2; }
printf 'disk4\n\tmap node=other,path=%s,id=1b36:0010\n\tmap node=%s,path=%s,id=1b36:0010,iommugroup=%s,subsystem-id=%s:%s\n' \
    "$S1" "$(uname -n)" "$S4" "$(basename $(readlink /sys/bus/pci/devices/$S4/iommu_group))" \
    "$(sub $S4 vendor)" "$(sub $S4 device)" > /etc/pve/mapping/pci.cfg
conf 102 "hostpci0: mapping=disk4"
run_hook map_pre 102 pre-start
fact map_driver "$(vm_driver $S4)"
fact map_other "$(vm_driver $S1)"
run_hook map_post 102 post-stop
fact map_driver_after "$(vm_driver $S4)"

# Native multipath: the controller holds a hidden path, the disk is the subsystem's head.
M1=$VM_BDF_M1
ls /sys/bus/pci/devices/$M1/nvme/*/ > /results/multipath_layout.txt
write_marker M1 "marker-M1"
conf 103 "hostpci0: $M1"
run_hook mp_pre 103 pre-start
fact mp_driver "$(vm_driver $M1)"
run_hook mp_post 103 post-stop
fact mp_driver_after "$(vm_driver $M1)"
fact mp_marker "$(read_marker M1)"
exit 0
"""


def test_lifecycle_twins_shared_group_mapping(vm_workdir):
    topo = (Topology().isolated_nvme("S1").isolated_nvme("S2")
            .shared_group_nvme_and_nic("S3").isolated_nvme("S4").multipath_nvme("M1"))
    (nic,) = [d.bdf for d in topo.by_kind("nic")]
    res, f = guest(f"VM_NIC={nic}\n" + LIFECYCLE, topo, vm_workdir)
    s1, s3 = topo.bdf("S1"), topo.bdf("S3")

    pre = log(res, "pre")
    assert f["rc_pre"] == "0", pre
    assert f["drv_after_pre"] == "vfio-pci"
    assert f["override_after_pre"] == "vfio-pci"
    assert f"{s1} nvme -> vfio-pci" in pre
    assert f["vfio_open"] == "ok", (res.results_dir / "qmp.txt").read_text()
    assert f["twin_driver"] == "nvme"

    post = log(res, "post")
    assert f["rc_post"] == "0", post
    assert f["drv_after_post"] == "nvme"
    assert f["override_after_post"] == "(null)"
    assert f"{s1} vfio-pci -> nvme" in post
    assert f["disk_after_post"].startswith("/dev/nvme")
    assert "S1" in f["serial_after_post"]
    assert f["marker_read"] == f["marker_written"]
    assert f["rc_post_again"] == "0" and f["drv_after_post_again"] == "nvme"
    assert f["record_left"] == "0"

    shared = log(res, "shared")
    assert f["rc_shared"] == "11", shared
    assert f"{nic} (e1000, class 020000) is in IOMMU group" in shared
    assert "has the address 192.0.2.9" in shared
    assert f["shared_driver"] == "nvme" and f["shared_nic_driver"] == "e1000"
    assert f["shared_marker"] == "marker-S3"
    assert "-> vfio-pci" not in shared

    assert f["rc_map_pre"] == "0", log(res, "map_pre")
    assert f["map_driver"] == "vfio-pci" and f["map_other"] == "nvme"
    assert f["rc_map_post"] == "0" and f["map_driver_after"] == "nvme"

    layout = (res.results_dir / "multipath_layout.txt").read_text()
    assert re.search(r"^nvme\d+c\d+n1$", layout, re.M), layout  # really multipath
    pre = log(res, "mp_pre")
    assert f["rc_mp_pre"] == "0", pre
    assert re.search(r"nvme \(nvme\d+n1\)", pre), pre  # the head, found through the path
    assert f["mp_driver"] == "vfio-pci"
    assert f["rc_mp_post"] == "0", log(res, "mp_post")
    assert re.search(r"vfio-pci -> nvme: nvme\d+n1$", log(res, "mp_post"), re.M)
    assert f["mp_driver_after"] == "nvme" and f["mp_marker"] == "marker-M1"


HOST_USE = r"""
H1=$VM_BDF_H1 H2=$VM_BDF_H2
modprobe ext4; modprobe dm_mod
d=$(vm_nvme_disk H1)
conf 100 "hostpci0: $H1"

mkfs.ext4 -q -F $d && mount $d /mnt
run_hook mounted 100 pre-start; fact mounted_driver "$(vm_driver $H1)"
umount /mnt

printf 'label: gpt\n,64M\n,64M\n' | sfdisk -q $d; udevadm settle
mkfs.ext4 -q -F ${d}p1 && mount ${d}p1 /mnt
run_hook partition 100 pre-start; fact partition_driver "$(vm_driver $H1)"
umount /mnt

mkswap -q ${d}p2 >/dev/null && swapon ${d}p2
run_hook swap 100 pre-start; fact swap_driver "$(vm_driver $H1)"
swapoff ${d}p2

# Nothing in use any more: it passes.
run_hook free_pre 100 pre-start; fact free_driver "$(vm_driver $H1)"
run_hook free_post 100 post-stop; fact free_driver_after "$(vm_driver $H1)"

# The guest's own LVM on H2: active on the host is use, inactive is the normal case.
d2=$(vm_nvme_disk H2)
pvcreate -q $d2 && vgcreate -q guestvg $d2 && lvcreate -q -an -Zn -L 16M -n root guestvg >/dev/null
lvchange -ay guestvg/root
conf 101 "hostpci0: $H2"
# In use (held open): refused. Active but unused, pre-start's safety net would deactivate
# it (tests/vm/test_boot_vm.py).
exec 3</dev/guestvg/root
run_hook lvm_active 101 pre-start; fact lvm_active_driver "$(vm_driver $H2)"
exec 3<&-
vgchange -q -an guestvg >/dev/null
fact lv_active_before "$(lvs --noheadings -o lv_active guestvg/root | tr -d ' ')"
run_hook lvm_inactive 101 pre-start; fact lvm_inactive_driver "$(vm_driver $H2)"
run_hook lvm_post 101 post-stop; fact lvm_driver_after "$(vm_driver $H2)"
udevadm settle
fact lv_active_after "$(lvs --noheadings -o lv_active guestvg/root | tr -d ' ')"
fact vg_holders_after "$(ls /sys/class/block/$(basename $(vm_nvme_disk H2))/holders | wc -l)"
exit 0
"""


def test_host_use_refused_guest_lvm_passed(vm_workdir):
    topo = Topology().isolated_nvme("H1").isolated_nvme("H2")
    res, f = guest(HOST_USE, topo, vm_workdir)
    for name, expect in [("mounted", "is mounted at /mnt"), ("partition", "p1 is mounted at /mnt"),
                         ("swap", "p2 is active swap"), ("lvm_active", "an active LVM volume")]:
        out = log(res, name)
        assert f[f"rc_{name}"] == "11", out
        assert expect in out, out
        assert f[f"{name}_driver"] == "nvme"
    assert f["rc_free_pre"] == "0" and f["free_driver"] == "vfio-pci", log(res, "free_pre")
    assert f["rc_free_post"] == "0" and f["free_driver_after"] == "nvme"

    assert f["lv_active_before"] == ""
    out = log(res, "lvm_inactive")
    assert f["rc_lvm_inactive"] == "0", out
    assert "carries an LVM physical volume, not active on the host" in out
    assert f["lvm_inactive_driver"] == "vfio-pci"
    assert f["rc_lvm_post"] == "0", log(res, "lvm_post")
    assert f["lvm_driver_after"] == "nvme"
    # udev's LVM rules auto-activated guestvg on the returned disk; the hook undid it.
    assert f["lv_active_after"] == "", log(res, "lvm_post")
    assert f["vg_holders_after"] == "0"


FAILURES = r"""
F1=$VM_BDF_F1 F2=$VM_BDF_F2

# Several devices, one fails: F2's driver_override refuses writes (a read-only bind mount
# over the sysfs attribute), so F1 moves and must come back.
: > /tmp/ro
mount --bind /tmp/ro /sys/bus/pci/devices/$F2/driver_override
mount -o remount,bind,ro /sys/bus/pci/devices/$F2/driver_override
conf 100 "hostpci0: $F1\nhostpci1: $F2"
run_hook fail 100 pre-start
umount /sys/bus/pci/devices/$F2/driver_override
fact fail_f1 "$(vm_driver $F1)"; fact fail_f2 "$(vm_driver $F2)"
fact fail_f1_disk "$(vm_nvme_disk F1)"

# Two VMs, one device, at the same time.
conf 200 "hostpci0: $F1"; conf 201 "hostpci0: $F1"
("$HOOK" 200 pre-start > /results/race200.log 2>&1; echo $? > /results/race200.rc) &
("$HOOK" 201 pre-start > /results/race201.log 2>&1; echo $? > /results/race201.rc) &
wait
fact race_rcs "$(cat /results/race200.rc /results/race201.rc | sort | tr '\n' ' ')"
fact race_driver "$(vm_driver $F1)"
run_hook race_post200 200 post-stop; run_hook race_post201 201 post-stop
fact race_driver_after "$(vm_driver $F1)"
# The winner pinned F1 as its drive (pvehook.pins); the scenarios below give F1 to other
# VMs: forget the pins, as a node where they were never made.
rm -f /var/lib/pvehook/pins.json

# F2's drive is throttled: with direct I/O in flight, nvme takes seconds to let it go,
# like a real drive draining its queue. busy_f2 starts that I/O with Linux AIO and closes
# the disk: the reads stay in flight in the kernel with no process holding the disk open
# (a process that did would be "in use" to pre-start, rightly), as writeback does.
cat > /tmp/aio_reads.py <<'PY'
import ctypes, mmap, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
IO_SETUP, IO_DESTROY, IO_GETEVENTS, IO_SUBMIT = 206, 207, 208, 209  # x86_64
n = 8
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
ctx = ctypes.c_ulong(0)
assert libc.syscall(IO_SETUP, n, ctypes.byref(ctx)) == 0, ctypes.get_errno()
bufs = [mmap.mmap(-1, 4096) for _ in range(n)]
iocbs = []
for i, b in enumerate(bufs):  # struct iocb (linux/aio_abi.h), IOCB_CMD_PREAD = 0; 1 MiB apart:
    # the block layer merges adjacent reads into one request, drained at once
    addr = ctypes.addressof(ctypes.c_char.from_buffer(b))
    iocbs.append(ctypes.create_string_buffer(
        struct.pack("<QIiHhIQQqQII", i, 0, 0, 0, 0, fd, addr, 4096, (i + 1) << 20, 0, 0, 0), 64))
ptrs = (ctypes.c_void_p * n)(*[ctypes.addressof(x) for x in iocbs])
assert libc.syscall(IO_SUBMIT, ctx, n, ptrs) == n, ctypes.get_errno()
os.close(fd)  # the reads keep the disk busy; no process has it open any more
open("/tmp/aio_submitted", "w").close()
events = ctypes.create_string_buffer(32 * n)
libc.syscall(IO_GETEVENTS, ctx, n, n, events, None)  # until all are done
PY
busy_f2() {
    rm -f /tmp/aio_submitted
    python3 /tmp/aio_reads.py $(vm_nvme_disk F2) &
    while [ ! -e /tmp/aio_submitted ]; do sleep 0.05; done
}

# A deadline: the hook gives up on F2 after 1 s, gives F1 back, keeps F2 recorded.
busy_f2
PVEHOOK_TIMEOUT_REBIND=1 run_hook deadline 100 pre-start
fact deadline_f1 "$(vm_driver $F1)"
wait  # the I/O drains, nvme lets F2 go; the hook's write finishes in the kernel
run_hook deadline_post 100 post-stop
fact deadline_post_f1 "$(vm_driver $F1)"; fact deadline_post_f2 "$(vm_driver $F2)"

# Killed halfway: SIGKILL once F1 is on vfio-pci, while F2 is still draining. F2's lock
# (flock, as filelock takes it) holds the hook back until F2's I/O is in flight.
conf 300 "hostpci0: $F1\nhostpci1: $F2"
mkdir -p -m 0700 /run/pvehook /run/pvehook/locks
exec 9> /run/pvehook/locks/$F2.lock
flock 9
"$HOOK" 300 pre-start > /results/killed.log 2>&1 &
pid=$!
until ls -l /proc/$pid/fd 2>/dev/null | grep -q "$F2.lock"; do sleep 0.1; done  # waiting
busy_f2
flock -u 9; exec 9>&-
while [ "$(vm_driver $F1)" != vfio-pci ] && kill -0 $pid 2>/dev/null; do sleep 0.02; done
fact killed_f2_at_kill "$(vm_driver $F2)"
kill -9 $pid; wait $pid
fact killed_f1 "$(vm_driver $F1)"
run_hook killed_post 300 post-stop
wait
fact killed_post_f1 "$(vm_driver $F1)"; fact killed_post_f2 "$(vm_driver $F2)"
fact killed_disks "$(vm_nvme_disk F1 >/dev/null && vm_nvme_disk F2 >/dev/null && echo both)"
exit 0
"""


def test_failures_races_and_crash(vm_workdir):
    topo = Topology().isolated_nvme("F1").isolated_nvme("F2", iops=1)
    res, f = guest(FAILURES, topo, vm_workdir)
    f2 = topo.bdf("F2")

    out = log(res, "fail")
    assert f["rc_fail"] == "13", out
    assert f"cannot set driver_override of {f2}" in out
    assert "rolling back" in out
    assert f["fail_f1"] == f["fail_f2"] == "nvme"
    assert f["fail_f1_disk"].startswith("/dev/nvme")

    assert f["race_rcs"].split() == ["0", "12"], (
        (res.results_dir / "race200.log").read_text() + (res.results_dir / "race201.log").read_text())
    assert f["race_driver"] == "vfio-pci"
    assert f["rc_race_post200"] == f["rc_race_post201"] == "0"
    assert f["race_driver_after"] == "nvme"

    out = log(res, "deadline")
    assert f["rc_deadline"] == "13", out
    assert f"driver nvme did not release {f2}: no answer from the kernel within 1 s" in out
    assert f"the kernel is still busy with {f2}" in out
    assert f["deadline_f1"] == "nvme"
    assert f["rc_deadline_post"] == "0", log(res, "deadline_post")
    assert f["deadline_post_f1"] == f["deadline_post_f2"] == "nvme"

    # F1 moved; F2 still draining on nvme, or released and not yet on vfio-pci.
    assert f["killed_f2_at_kill"] in ("nvme", "none")
    assert f["killed_f1"] == "vfio-pci"
    assert f["rc_killed_post"] == "0", log(res, "killed_post")
    assert f["killed_post_f1"] == f["killed_post_f2"] == "nvme"
    assert f["killed_disks"] == "both"
