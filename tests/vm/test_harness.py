"""Smoke test of the VM harness itself: topologies, IOMMU groups, udev, VFIO rebinding.

Not a test of pvehook: if this fails, every other tests/vm test is meaningless.
"""
import re

from harness import Topology, run_guest

SMOKE = r"""
set -u
S1=$VM_BDF_S1 S2=$VM_BDF_S2
modprobe nvme
udevadm settle
echo "driver_S1=$(vm_driver $S1)"
echo "serial_at_S1=$(tr -d ' ' < /sys/bus/pci/devices/$S1/nvme/$(vm_nvme_ctrl $S1)/serial)"
echo "serial_at_S2=$(tr -d ' ' < /sys/bus/pci/devices/$S2/nvme/$(vm_nvme_ctrl $S2)/serial)"
echo "group_S1=$(vm_group $S1 | tr '\n' ' ')"
echo "group_S2=$(vm_group $S2 | tr '\n' ' ')"
disk=$(vm_nvme_disk S1)
echo "disk_S1=$disk"
echo "id_serial=$(udevadm info --query=property --property=ID_SERIAL --value $disk)"
python3 -c 'import pyudev, sys; d = pyudev.Devices.from_device_file(pyudev.Context(), sys.argv[1]); print("pyudev_serial=" + d.properties.get("ID_SERIAL", ""), "pyudev_pci=" + d.find_parent("pci").sys_name, sep="\n")' $disk

modprobe vfio-pci || exit 10
vm_bind $S1 vfio-pci; echo "after_vfio=$(vm_driver $S1)"
echo "vfio_dev=$(ls /dev/vfio/$(basename $(readlink /sys/bus/pci/devices/$S1/iommu_group)))"
vm_vfio_open $S1 >/tmp/qmp.txt && echo "vfio_open=ok" || { echo "vfio_open=FAIL"; cat /tmp/qmp.txt; }
vm_bind $S1 nvme; echo "after_nvme=$(vm_driver $S1)"
udevadm settle
echo "disk_S1_again=$(vm_nvme_disk S1)"
echo "versions=$(python3 -c 'import sys, click, filelock, pyudev, proxmoxer; print(sys.version.split()[0], click.__version__, filelock.__version__, pyudev.__version__, proxmoxer.__version__)')"
echo "pythonpath=$PYTHONPATH cwd=$PWD"
touch /results/written-by-guest
exit 7
"""


def _values(output: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^(\w+)=(.*)$", output, re.M))


def test_smoke(vm_workdir):
    topo = Topology().isolated_nvme("S1").shared_group_nvme_and_nic("S2")
    res = run_guest(SMOKE, topo, timeout=240, workdir=vm_workdir)
    print(res.output)
    print(f"boot took {res.duration:.1f}s; console: {res.console_log}")
    # The script's own exit code comes back, not a generic success.
    assert res.exit_code == 7, res.output
    v = _values(res.output)
    s1, s2 = topo.bdf("S1"), topo.bdf("S2")
    (bridge,) = [d.bdf for d in topo.by_kind("bridge")]
    (nic,) = [d.bdf for d in topo.by_kind("nic")]

    # Predicted addresses are the guest's real ones.
    assert v["serial_at_S1"] == "S1" and v["serial_at_S2"] == "S2", res.output
    assert v["driver_S1"] == "nvme"
    assert v["group_S1"].split() == [s1]
    assert sorted(v["group_S2"].split()) == sorted([bridge, s2, nic])
    # udev runs in the chroot and fills properties.
    assert "S1" in v["id_serial"], res.output
    assert "S1" in v["pyudev_serial"] and v["pyudev_pci"] == s1, res.output
    # VFIO round trip, with the nested QEMU proof in between.
    assert v["after_vfio"] == "vfio-pci", res.output
    assert v["vfio_dev"], res.output
    assert v["vfio_open"] == "ok", res.output
    assert v["after_nvme"] == "nvme", res.output
    assert v["disk_S1_again"].startswith("/dev/nvme"), res.output
    assert v["versions"].startswith("3.13"), res.output
    assert v["pythonpath"] == "/src cwd=/src"
    # The results share is writable from the guest.
    assert (res.results_dir / "written-by-guest").exists()
    assert "PVEHOOK-VM-EXIT=7" in res.console
