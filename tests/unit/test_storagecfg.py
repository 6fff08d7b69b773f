from pathlib import Path

import pytest

from pvehook.errors import ConfigError
from pvehook.paths import Root
from pvehook.storagecfg import LvmVolume, load_storage_cfg, lvm_volume, parse_storage_cfg
from pvehook.vmconfig import Disk, VmConfig

PVE = Path(__file__).parent / "fixtures" / "pve"


@pytest.fixture
def storages():
    return parse_storage_cfg((PVE / "storage.cfg").read_text())


def test_parse(storages):
    assert set(storages) == {"local", "local-lvm", "thick", "dirstore", "nvme-lvm"}
    assert storages["local-lvm"].type == "lvmthin"
    assert storages["local-lvm"].options == {"thinpool": "data", "vgname": "pve", "content": "rootdir,images"}
    assert storages["thick"].options["saferemove"] == "1"  # bare key: boolean true
    assert storages["nvme-lvm"].type == "lvm"  # type is lower-cased


def test_local_always_dir():
    assert parse_storage_cfg("")["local"].options["path"] == "/var/lib/vz"
    s = parse_storage_cfg("lvm: local\n\tvgname x\n")
    assert s["local"].type == "dir"


def test_lvm_volumes_of_fixture_vm(storages):
    cfg = VmConfig.from_text(100, (PVE / "qemu-server" / "100.conf").read_text())
    vols = {d.key: lvm_volume(storages, d) for d in cfg.disks}
    assert vols["scsi0"] == LvmVolume("local-lvm", "pve", "vm-100-disk-0", "data")
    assert vols["scsi0"].dev_path == "/dev/pve/vm-100-disk-0"
    assert vols["scsi1"].dev_path == "/dev/vg-thick/vm-100-disk-2" and vols["scsi1"].thinpool is None
    assert vols["efidisk0"].dev_path == "/dev/pve/vm-100-disk-1"
    assert vols["tpmstate0"].dev_path == "/dev/pve/vm-100-disk-3"
    assert vols["virtio0"] is None  # dir storage
    assert vols["sata0"] is None  # /dev path
    assert vols["ide2"] is None  # iso on local


def test_qcow2_on_lvm(storages):
    v = lvm_volume(storages, Disk.parse("virtio3", "nvme-lvm:vm-101-disk-0.qcow2"))
    assert v.format == "qcow2" and v.dev_path == "/dev/nvme/vm-101-disk-0.qcow2"


def test_none_cdrom(storages):
    assert lvm_volume(storages, Disk.parse("ide2", "none,media=cdrom")) is None


@pytest.mark.parametrize(
    "value, match",
    [
        ("nosuch:vm-1-disk-0", "not in storage.cfg"),
        ("thick:base-1-disk-0", "cannot parse lvm volume"),  # thick LVM has no base- volumes
        ("local-lvm:foo", "cannot parse lvmthin volume"),
    ],
)
def test_lvm_errors(storages, value, match):
    with pytest.raises(ConfigError, match=match):
        lvm_volume(storages, Disk.parse("scsi0", value))


def test_lvmthin_base_volume(storages):
    assert lvm_volume(storages, Disk.parse("scsi0", "local-lvm:base-1-disk-0")).lv == "base-1-disk-0"


def test_load(tmp_path):
    root = Root(tmp_path)
    assert set(load_storage_cfg(root)) == {"local"}
    root.pve().mkdir(parents=True)
    root.pve("storage.cfg").write_bytes((PVE / "storage.cfg").read_bytes())
    assert "thick" in load_storage_cfg(root)
