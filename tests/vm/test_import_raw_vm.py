"""`pvehook import-raw` on the real kernel: its refusals with a real disk in use, and an
import that proceeds into a real thin LV. One boot.

The guest runs the CLI as on a node (PVEHOOK_ROOT unset: "/"), so the host-use checks read
the guest's real /sys, /proc and /dev and probe the real disk with O_EXCL. The Proxmox API
is the stand-in pvesh/pvesm of tests/cli/bin (first on PATH), which keeps its /etc/pve
under the same "/" (the guest's root is a throw-away overlay) and, with FAKEPVE_LVM=real,
allocates real thin LVs with lvcreate and copies the disk into them.
"""

from __future__ import annotations

from harness import Topology, run_guest

SCRIPT = r"""
set -u
modprobe dm_mod && modprobe dm_thin_pool && modprobe ext4 && modprobe virtio_blk
udevadm settle
export PATH=/src/tests/cli/bin:$PATH FAKEPVE_LVM=real
D=$(vm_nvme_disk SRC)
N=${D#/dev/}
BYID=$(for l in /dev/disk/by-id/nvme-*; do [ "$(readlink -f $l)" = "$D" ] && echo $l; done | head -1)
echo "source $D ($BYID)"

# the node: /etc/pve of a lone node pve1, VM 100 stopped, a thin pool on another disk
mkdir -p /etc/pve/nodes/pve1/qemu-server /var/lib/vz
ln -s nodes/pve1 /etc/pve/local
ln -s nodes/pve1/qemu-server /etc/pve/qemu-server
printf 'dir: local\n\tpath /var/lib/vz\n\tcontent iso,snippets\n\nlvmthin: local-lvm\n\tthinpool data\n\tvgname pve\n\tcontent rootdir,images\n' > /etc/pve/storage.cfg
printf 'memory: 1024\nname: seed\n' > /etc/pve/nodes/pve1/qemu-server/100.conf
V=$(readlink -f /dev/disk/by-id/virtio-LVM)
pvcreate -q $V && vgcreate -q pve $V && lvcreate -q -L 200M -T pve/data

# the source: a partition table, an ext4 and a swap partition, a known pattern at the end
printf 'label: gpt\n,16M\n,16M\n' | sfdisk -q $D
udevadm settle
mkfs.ext4 -q ${D}p1 && mkswap -q ${D}p2 >/dev/null
dd if=/dev/urandom of=$D bs=1M seek=40 count=8 conv=fsync status=none
udevadm settle

run() {  # run NAME ARGS...: the CLI, its output and exit code in /results
    local name=$1; shift
    python3 -m pvehook.cli "$@" > /results/$name.out 2>&1
    echo $? > /results/$name.rc
    echo "== $name: rc $(cat /results/$name.rc)"; cat /results/$name.out
}

mkdir -p /mnt/p1 && mount ${D}p1 /mnt/p1
run mounted import-raw 100 $BYID local-lvm
umount /mnt/p1

swapon ${D}p2
run swap import-raw 100 $BYID local-lvm
swapoff ${D}p2

# an exclusive opener that leaves no other trace (as a ZFS pool does)
python3 -c 'import os,sys,time; fd=os.open(sys.argv[1], os.O_RDONLY|os.O_EXCL); open("/tmp/held","w").close(); time.sleep(300)' $D &
HOLDER=$!
while [ ! -e /tmp/held ]; do sleep 0.1; done
run exclusive import-raw 100 $BYID local-lvm
kill $HOLDER; wait $HOLDER 2>/dev/null

run partition import-raw 100 ${D}p1 local-lvm

sleep 300 & SLEEPER=$!
mkdir -p /run/qemu-server && echo $SLEEPER > /run/qemu-server/100.pid
run running import-raw 100 $BYID local-lvm
rm /run/qemu-server/100.pid; kill $SLEEPER

run dryrun import-raw 100 $BYID local-lvm --dry-run
lvs --noheadings -o lv_name pve > /results/lvs-after-refusals.txt

run free import-raw 100 $BYID local-lvm
cp /etc/pve/nodes/pve1/qemu-server/100.conf /results/100.conf
lvs --noheadings -o lv_name,lv_size,lv_active --units b --nosuffix pve/vm-100-disk-0 > /results/lv.txt
lvchange -ay -K pve/vm-100-disk-0
cmp $D /dev/pve/vm-100-disk-0 && echo same > /results/cmp.txt
lvchange -an pve/vm-100-disk-0
run check check 100
exit 0
"""


def test_import_raw_refusals_and_import_on_a_real_disk(vm_workdir):
    topo = Topology().isolated_nvme("SRC", size="64M").plain_disk("LVM", size="256M")
    res = run_guest(SCRIPT, topology=topo, workdir=vm_workdir, timeout=400)
    assert res.exit_code == 0, res.output
    r = res.results_dir

    def outcome(name):
        return int((r / f"{name}.rc").read_text()), (r / f"{name}.out").read_text()

    code, out = outcome("mounted")
    assert code == 11, out
    assert "the host uses /dev/nvme0n1: nvme0n1p1 is mounted at /mnt/p1" in out

    code, out = outcome("swap")
    assert code == 11, out
    assert "nvme0n1p2 is active swap" in out

    code, out = outcome("exclusive")
    assert code == 11, out
    # A process holding it (with O_EXCL here) is named by the scan of /proc, before the
    # exclusive-open probe that catches holders without a process (a ZFS pool).
    assert "nvme0n1 is open by pid" in out

    code, out = outcome("partition")
    assert code == 2, out
    assert "pass the whole disk /dev/nvme0n1" in out

    code, out = outcome("running")
    assert code == 16, out
    assert "VM 100 is running" in out

    code, out = outcome("dryrun")
    assert code == 0, out
    assert "whole disk, 64 MiB, not used by the host" in out
    assert "import-from=/dev/nvme0n1,format=raw,cache=writeback,discard=on" in out
    assert (r / "lvs-after-refusals.txt").read_text().split() == ["data"]

    code, out = outcome("free")
    assert code == 0, out
    assert '  Logical volume "vm-100-disk-0" created.' in out
    assert "  transferred 64.0 MiB of 64.0 MiB (100.00%)" in out
    assert "VM 100 on pve1: registered" in out
    conf = (r / "100.conf").read_text()
    assert "scsi0: local-lvm:vm-100-disk-0,cache=writeback,discard=on,size=64M\n" in conf
    assert "hookscript: local:snippets/pvehook-hook\n" in conf
    name, size, *active = (r / "lv.txt").read_text().split()
    # inactive after the copy, as Proxmox leaves it
    assert (name, int(size), active) == ("vm-100-disk-0", 64 << 20, [])
    assert (r / "cmp.txt").read_text().strip() == "same"  # every byte, partition table included

    code, out = outcome("check")
    assert code == 0, out
    assert "scsi0 local-lvm:vm-100-disk-0 -> /dev/pve/vm-100-disk-0: raw, 64 MiB" in out
