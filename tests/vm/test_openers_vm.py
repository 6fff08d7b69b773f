"""A namespace open by another VM's QEMU (a RAW disk by path) on the real kernel. One boot.

VM 300 runs with the namespace as `scsi1: /dev/disk/by-id/...` (a real, paused
qemu-system-x86_64 with the disk as a raw drive and qemu-server's pid file); VM 101 passes
the controller. QEMU opens the disk without O_EXCL, so the exclusive-open probe passes;
only the scan of every process's open files sees it. The assertions are about what the
guest shows: the hook's exit code and lines, the driver, the opener's reads. A holder in
another mount namespace (a container's /dev naming the disk as one of our other disks)
is found by device number, not by name.
"""

from __future__ import annotations

import re

from harness import Topology, run_guest

SCRIPT = r"""
set -u
HOOK=/src/hooks/pvehook-hook
fact() { echo "$1=$2"; }
run_hook() { local n=$1; shift; "$HOOK" "$@" > /results/$n.log 2>&1; fact rc_$n $?; }
# import-raw's source check, as `pvehook import-raw` runs it (no Proxmox API needed)
check_source() {
  python3 - "$2" > /results/$1.log 2>&1 <<'EOF'
import sys
from pvehook.context import Context
from pvehook.errors import PvehookError
from pvehook.cli.importraw import check_source, resolve_source
ctx = Context()
try:
    lines, notes = check_source(ctx, resolve_source(ctx, sys.argv[1]))
except PvehookError as e:
    print(e)
    sys.exit(e.exit_code)
print("\n".join(lines + notes))
EOF
  fact rc_$1 $?
}
modprobe vfio-pci
udevadm settle
H=$VM_BDF_S1
D=$(vm_nvme_disk S1); N=${D#/dev/}
BYID=$(for l in /dev/disk/by-id/nvme-*; do [ "$(readlink -f $l)" = "$D" ] && echo $l; done | head -1)
fact byid $BYID
mkdir -p /etc/pve/qemu-server /run/qemu-server
printf 'hostpci0: %s\n' ${H#0000:} > /etc/pve/qemu-server/101.conf
printf 'memory: 64\nscsi1: %s,size=64M\n' $BYID > /etc/pve/qemu-server/300.conf
printf 'PVEHOOK-MARK' | dd of=$D bs=512 seek=100 conv=sync,fsync status=none

# 1. VM 300's QEMU holds the namespace (a raw drive by path), as qemu-server starts it
qemu-system-x86_64 -S -machine none -nodefaults -display none -name vm300 \
  -drive file=$BYID,format=raw,if=none,id=drive-scsi1 \
  -pidfile /run/qemu-server/300.pid -daemonize
QPID=$(cat /run/qemu-server/300.pid)
fact qemu_pid $QPID
fact qemu_fd "$(ls -l /proc/$QPID/fd | grep -c " $D\$")"
# the premise: QEMU's open is not exclusive, the O_EXCL probe passes
python3 -c 'import os,sys; os.close(os.open(sys.argv[1], os.O_RDONLY|os.O_EXCL))' $D
fact excl_probe_passes $?
run_hook qemu 101 pre-start
fact qemu_driver "$(vm_driver $H)"
check_source import_qemu $BYID
kill $QPID
while [ -d /proc/$QPID ]; do sleep 0.1; done
rm -f /run/qemu-server/300.pid

# 2. a shell holding the namespace through a node of its own name (found by st_rdev)
MM=$(cat /sys/class/block/$N/dev)
mknod /dev/pvehook-alias b ${MM%:*} ${MM#*:}
mkfifo /tmp/go
( exec 3</dev/pvehook-alias; : > /tmp/ready; read -r _ < /tmp/go
  dd bs=512 skip=100 count=1 status=none <&3 | tr -d '\0' > /tmp/readback ) &
SL=$!
while [ ! -e /tmp/ready ] && kill -0 $SL 2>/dev/null; do sleep 0.05; done
fact sleeper_pid $SL
run_hook alias 101 pre-start
fact alias_driver "$(vm_driver $H)"
echo > /tmp/go
wait $SL
fact readback "$(cat /tmp/readback)"

# 3. a process in another mount namespace (a container) holding it as its /dev/vda, the
# name of another block device of ours: only st_rdev tells which disk it is
modprobe virtio_blk; udevadm settle
V=$(ls /sys/class/block | grep -m1 '^vd')
fact other_disk $V
unshare -m --propagation private bash -c "mount -t tmpfs tmpfs /dev &&
  mknod /dev/$V b ${MM%:*} ${MM#*:} && exec 3</dev/$V && : > /tmp/ns-ready &&
  exec sleep 300" &
NSP=$!
while [ ! -e /tmp/ns-ready ] && kill -0 $NSP 2>/dev/null; do sleep 0.05; done
fact ns_link "$(readlink /proc/$NSP/fd/3)"
fact ns_differs "$([ "$(readlink /proc/$NSP/ns/mnt)" != "$(readlink /proc/self/ns/mnt)" ] && echo yes)"
run_hook ns 101 pre-start
fact ns_driver "$(vm_driver $H)"
fact ns_pid $NSP
kill $NSP; wait $NSP 2>/dev/null

# 4. a loop device over the namespace: the loop driver holds it in the kernel (no fd,
# no holders/ link); its backing_file names it
modprobe loop
losetup /dev/loop0 $D
fact loop_backing "$(cat /sys/block/loop0/loop/backing_file)"
run_hook loop 101 pre-start
fact loop_driver "$(vm_driver $H)"
losetup -d /dev/loop0

# 5. nobody holds it: pre-start passes and warns about VM 300's config
check_source import_free $BYID
run_hook free 101 pre-start
fact free_driver "$(vm_driver $H)"
run_hook free_post 101 post-stop
fact back_driver "$(vm_driver $H)"
exit 0
"""


def facts(output: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^(\w+)=(.*)$", output, re.M))


def test_a_namespace_open_by_another_vm_is_not_taken(vm_workdir):
    topo = Topology().isolated_nvme("S1", size="64M").plain_disk("OTHER", size="16M")
    res = run_guest(SCRIPT, topo, timeout=420, workdir=vm_workdir)
    print(res.output)
    print(f"boot took {res.duration:.1f} s")
    assert res.exit_code == 0, res.output
    f = facts(res.output)
    r = res.results_dir

    def log(name):
        return (r / f"{name}.log").read_text()

    addr = topo.bdf("S1")
    assert f["qemu_fd"] == "1" and f["excl_probe_passes"] == "0"  # what the probe misses
    assert f["rc_qemu"] == "11", log("qemu")
    assert (f"nvme0n1 is open by pid {f['qemu_pid']} (qemu-system-x86), the QEMU of running"
            " VM 300") in log("qemu")
    assert "VM 101 not started" in log("qemu")
    assert f["qemu_driver"] == "nvme"
    assert f["rc_import_qemu"] == "11", log("import_qemu")
    assert "the host uses /dev/nvme0n1: nvme0n1 is open by pid" in log("import_qemu")

    assert f["rc_alias"] == "11", log("alias")
    assert f"nvme0n1 is open by pid {f['sleeper_pid']} (bash)" in log("alias")
    assert f["alias_driver"] == "nvme"
    assert f["readback"] == "PVEHOOK-MARK"  # the opener's reads still work afterwards

    # (/newroot/dev/vda here: the guest's root is a chroot, and a path of another mount
    # namespace reads from that namespace's root; in an LXC container, /dev/vda)
    assert f["ns_differs"] == "yes" and f["ns_link"].endswith(f"/dev/{f['other_disk']}")
    assert f["rc_ns"] == "11", log("ns")
    assert f"nvme0n1 is open by pid {f['ns_pid']} (sleep)" in log("ns")
    assert f["other_disk"] not in log("ns")
    assert f["ns_driver"] == "nvme"

    assert f["loop_backing"] == "/dev/nvme0n1"
    assert f["rc_loop"] == "11" and "nvme0n1 backs the loop device loop0" in log("loop")
    assert f["loop_driver"] == "nvme"

    assert f["rc_import_free"] == "0", log("import_free")
    warning = (f"warning: VM 300 (not running) has nvme0n1 by path in its config"
               f" (scsi1: {f['byid']})")
    assert warning in log("import_free")
    assert f["rc_free"] == "0", log("free")
    assert f"{addr}: {warning}" in log("free")
    assert f["free_driver"] == "vfio-pci"
    assert f["rc_free_post"] == "0" and f["back_driver"] == "nvme"
