"""Reboots and failed starts on a real kernel: one boot, four scenarios.

The guest has no systemd as PID 1 (busybox init, then a chroot), so the deferred
release runs as the detached process (pvehook/later.py). Its bound is set short with
PVEHOOK_TIMEOUT_GIVE_BACK; the script waits on the job's process (its pid is in the
hook's line), then reads the driver from sysfs and the marker from the disk.
"""

from __future__ import annotations

import re

from harness import Topology, run_guest

SCRIPT = r"""
set -u
HOOK=/src/hooks/pvehook-hook
mkdir -p /etc/pve/qemu-server /run/qemu-server
modprobe nvme
modprobe vfio-pci
udevadm settle
S1=$VM_BDF_S1 S2=$VM_BDF_S2
fact() { echo "$1=$2"; }
conf() { printf '%b\n' "$2" > /etc/pve/qemu-server/$1.conf; }
run_hook() { local n=$1; shift; "$HOOK" "$@" > /results/$n.log 2>&1; fact rc_$n $?; }
write_marker() { printf '%s' "$2" | dd of=$(vm_nvme_disk $1) bs=512 seek=2048 conv=sync,fsync status=none; }
read_marker() { dd if=$(vm_nvme_disk $1) bs=512 skip=2048 count=1 status=none | tr -d '\0'; }
rec() { jq -r "$2" /run/pvehook/$1.json 2>/dev/null || echo none; }
# The deferred release's pid, from the hook's line "...; process <pid>)".
job() { sed -n 's/.*; process \([0-9]*\)).*/\1/p' /results/$1.log | tail -1; }
# alive PID: a process that has not exited (an exited orphan may stay a zombie here).
alive() { [ -r /proc/$1/stat ] && ! grep -qs '^[0-9]* ([^)]*) Z' /proc/$1/stat; }
# wait_job PID: until the job has run (bounded: 300 s).
wait_job() { local i; for i in $(seq 3000); do alive $1 || return 0; sleep 0.1; done; return 1; }
# A stand-in QEMU: a live process named in /run/qemu-server/<vmid>.pid.
qemu_start() { sleep 1000 & echo $! > /run/qemu-server/$1.pid; }
qemu_stop() { kill $(cat /run/qemu-server/$1.pid); rm -f /run/qemu-server/$1.pid; }

write_marker S1 "marker-S1-$$"
fact marker_written "marker-S1-$$"
conf 100 "memory: 1024\nmachine: q35\nhostpci0: ${S1#0000:},pcie=1"

# 1. qm reboot: post-stop with the reboot file, then the restart's pre-start.
# Bounds of 600 s: none of this part's releases may run during it.
export PVEHOOK_TIMEOUT_GIVE_BACK=600
# Through a pipe, as Proxmox reads the hook: the reader gets EOF when the hook exits,
# not when its detached release (asleep for 600 s) does; else timeout kills it: 124.
timeout 120 bash -c 'set -o pipefail; "$0" 100 pre-start 2>&1 | cat > /results/r_pre.log' "$HOOK"
fact rc_r_pre $?
fact r_pre_drv "$(vm_driver $S1)"
qemu_start 100; qemu_stop 100
touch /run/qemu-server/100.reboot
run_hook r_post 100 post-stop
fact r_post_drv "$(vm_driver $S1)"
fact r_kept "$(rec 100 '.kept_for_reboot != null')"
fact r_original "$(rec 100 '.devices[0].original_driver')"
rm /run/qemu-server/100.reboot
run_hook r_pre2 100 pre-start
fact r_pre2_drv "$(vm_driver $S1)"
vm_vfio_open $S1 > /results/qmp.txt 2>&1 && fact r_vfio_open ok || fact r_vfio_open failed
run_hook r_final 100 post-stop
fact r_final_drv "$(vm_driver $S1)"
fact r_marker "$(read_marker S1)"

# 2. A reboot whose restart never comes: the device goes back after the bound.
run_hook n_pre 100 pre-start
export PVEHOOK_TIMEOUT_GIVE_BACK=3
touch /run/qemu-server/100.reboot
run_hook n_post 100 post-stop
fact n_post_drv "$(vm_driver $S1)"
wait_job $(job n_post); fact n_job_done $?
fact n_drv "$(vm_driver $S1)"
fact n_marker "$(read_marker S1)"
fact n_record "$(ls /run/pvehook/*.json 2>/dev/null | wc -l)"  # locks/ stays
rm -f /run/qemu-server/100.reboot

# 3. A start that fails after pre-start (VM 101, the other controller): no QEMU, no
# post-stop; the device goes back after the bound.
write_marker S2 "marker-S2-$$"
conf 101 "memory: 1024\nhostpci0: $S2"
run_hook f_pre 101 pre-start
fact f_pre_drv "$(vm_driver $S2)"
wait_job $(job f_pre); fact f_job_done $?
fact f_drv "$(vm_driver $S2)"
fact f_marker "$(read_marker S2)"

# 4. A newer start in between: start 1's release and its reboot's find start 2. As
# qemu-server does through a start and through qm cleanup, this shell holds the VM's
# config lock meanwhile: releases that come due wait for it.
mkdir -p /run/lock/qemu-server
exec 9>>/run/lock/qemu-server/lock-100.conf
flock 9
run_hook g_pre 100 pre-start
touch /run/qemu-server/100.reboot
run_hook g_post 100 post-stop
rm /run/qemu-server/100.reboot
export PVEHOOK_TIMEOUT_GIVE_BACK=600
run_hook g_pre2 100 pre-start
# Start 1's release came due (3 s) and waits for the lock.
J1=$(job g_pre)
for i in $(seq 3000); do ls -l /proc/$J1/fd 2>/dev/null | grep -q lock-100.conf && break; sleep 0.1; done
fact g_waited "$(ls -l /proc/$J1/fd 2>/dev/null | grep -c lock-100.conf)"
fact g_drv_locked "$(vm_driver $S1)"
exec 9>&-
wait_job $J1; fact g_job1_done $?
wait_job $(job g_post); fact g_job2_done $?
fact g_drv "$(vm_driver $S1)"

# pvehook release: refused while the VM runs, done once it stopped.
qemu_start 100
python3 -m pvehook.cli release 100 > /results/rel_running.log 2>&1; fact rc_rel_running $?
fact rel_running_drv "$(vm_driver $S1)"
qemu_stop 100
python3 -m pvehook.cli release 100 > /results/rel.log 2>&1; fact rc_rel $?
fact rel_drv "$(vm_driver $S1)"
fact rel_marker "$(read_marker S1)"
exit 0
"""


def facts(output: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^(\w+)=(.*)$", output, re.M))


def test_reboot_keeps_the_device_and_a_failed_start_gives_it_back(vm_workdir):
    topo = Topology().isolated_nvme("S1").isolated_nvme("S2")
    res = run_guest(SCRIPT, topo, timeout=900, workdir=vm_workdir)
    print(res.output)
    print(f"boot took {res.duration:.1f} s")
    assert res.exit_code == 0, res.output
    f = facts(res.output)
    s1, s2 = topo.bdf("S1"), topo.bdf("S2")

    def log(name):
        return (res.results_dir / f"{name}.log").read_text()

    # 1. The reboot keeps the device on vfio-pci; the last stop gives it back.
    assert f["rc_r_pre"] == "0", log("r_pre")  # 124: the reader waited for the release
    assert f["r_pre_drv"] == "vfio-pci"
    assert f["rc_r_post"] == "0", log("r_post")
    assert f["r_post_drv"] == "vfio-pci"
    assert f"{s1} stays on vfio-pci for the reboot of VM 100" in log("r_post")
    assert f["r_kept"] == "true" and f["r_original"] == "nvme"
    assert f["rc_r_pre2"] == "0" and f["r_pre2_drv"] == "vfio-pci", log("r_pre2")
    assert f["r_vfio_open"] == "ok", (res.results_dir / "qmp.txt").read_text()
    assert f["rc_r_final"] == "0" and f["r_final_drv"] == "nvme", log("r_final")
    assert f["r_marker"] == f["marker_written"]

    # 2. No restart: back on nvme after the bound, data intact, no record left.
    assert f["rc_n_post"] == "0" and f["n_post_drv"] == "vfio-pci", log("n_post")
    assert f["n_job_done"] == "0"
    assert f["n_drv"] == "nvme"
    assert f["n_marker"] == f["marker_written"]
    assert f["n_record"] == "0"

    # 3. The failed start: back on nvme without any post-stop.
    assert f["rc_f_pre"] == "0" and f["f_pre_drv"] == "vfio-pci", log("f_pre")
    assert f"{s2} nvme -> vfio-pci" in log("f_pre")
    assert f["f_job_done"] == "0"
    assert f["f_drv"] == "nvme"
    assert f["f_marker"].startswith("marker-S2-")

    # 4. Start 1's releases waited for the VM's lock, then left start 2's device alone.
    assert f["g_waited"] == "1" and f["g_drv_locked"] == "vfio-pci"
    assert f["g_job1_done"] == f["g_job2_done"] == "0"
    assert f["g_drv"] == "vfio-pci"
    assert f["rc_rel_running"] == "16", log("rel_running")
    assert "VM 100 is running" in log("rel_running")
    assert f["rel_running_drv"] == "vfio-pci"
    assert f["rc_rel"] == "0", log("rel")
    assert f["rel_drv"] == "nvme"
    assert f["rel_marker"] == f["marker_written"]
