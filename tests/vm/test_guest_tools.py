"""Proves the guest has what scenarios need besides rebinding: a plain (non-NVMe) disk,
LVM thin pools, ext4, the O_EXCL busy probe and an SR-IOV capable NVMe."""
import re

from harness import GuestError, Topology, run_guest

import pytest

TOOLS = r"""
set -eu
modprobe nvme; modprobe virtio_blk; modprobe dm_mod; modprobe dm_thin_pool; modprobe ext4
udevadm settle
vd=/dev/disk/by-id/virtio-HOSTDISK
echo "plain_disk=$(readlink -f $vd)"
pvcreate -q $vd; vgcreate -q vmtest $vd
lvcreate -q -L 100M -T vmtest/pool; lvcreate -q -V 200M -T vmtest/pool -n thin1
mkfs.ext4 -q /dev/vmtest/thin1; mkdir -p /mnt/t; mount /dev/vmtest/thin1 /mnt/t
echo "lv_attr=$(lvs --noheadings -o lv_attr vmtest/thin1 | tr -d ' ')"
d=$(vm_nvme_disk DATA)
mkfs.ext4 -q $d; mount $d /mnt/t
python3 -c 'import os,sys
try: os.close(os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL)); print("excl_mounted=free")
except OSError as e: print("excl_mounted=" + e.strerror)' $d
umount /mnt/t
python3 -c 'import os,sys; os.close(os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL)); print("excl_unmounted=free")' $d
echo "sriov_totalvfs=$(cat /sys/bus/pci/devices/$VM_BDF_PF/sriov_totalvfs)"
echo "secondary=$(nvme list-secondary /dev/$(vm_nvme_ctrl $VM_BDF_PF) | grep -c 'Secondary Controller State' || true)"
"""


def _values(output):
    return dict(m.groups() for m in re.finditer(r"^(\w+)=(.*)$", output, re.M))


def test_guest_tools(vm_workdir):
    topo = Topology().plain_disk("HOSTDISK").root_nvme("DATA").sriov_nvme("PF")
    res = run_guest(TOOLS, topo, timeout=240, workdir=vm_workdir)
    print(res.output)
    assert res.exit_code == 0, res.output
    v = _values(res.output)
    assert v["plain_disk"].startswith("/dev/vd")
    assert v["lv_attr"].startswith("Vwi-ao")
    assert v["excl_mounted"] == "Device or resource busy"
    assert v["excl_unmounted"] == "free"
    assert v["sriov_totalvfs"] == "2"
    assert v["secondary"] == "2", res.output


def test_timeout_raises_with_console(vm_workdir):
    with pytest.raises(GuestError) as exc:
        run_guest("echo started; sleep 600", timeout=25, workdir=vm_workdir)
    assert "timeout" in str(exc.value)
    assert "[script] started" in exc.value.console_tail or "running script" in exc.value.console_tail
