from pathlib import Path

import pytest

from pvehook.errors import ConfigError
from pvehook.paths import Root
from pvehook.pci import PciSelector
from pvehook.vmconfig import Disk, HostPci, VmConfig, parse_property_string

FIXTURES = Path(__file__).parent / "fixtures"


def _root(tmp_path: Path) -> Root:
    """A Root whose /etc/pve is tests/unit/fixtures/pve."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "pve").symlink_to(FIXTURES / "pve")
    return Root(tmp_path)


@pytest.fixture
def vm100(tmp_path):
    return VmConfig.load(_root(tmp_path), 100)


def test_property_string():
    assert parse_property_string("0000:01:00.0,pcie=1", "host") == {"host": "0000:01:00.0", "pcie": "1"}
    assert parse_property_string("a=b=c,,x=1") == {"a": "b=c", "x": "1"}
    with pytest.raises(ConfigError, match="duplicate"):
        parse_property_string("01:00.0,02:00.0", "host")
    with pytest.raises(ConfigError, match="duplicate"):
        parse_property_string("pcie=1,pcie=0", "host")
    with pytest.raises(ConfigError, match="missing key"):
        parse_property_string("01:00.0,pcie=", "host")
    with pytest.raises(ConfigError, match="without key"):
        parse_property_string("bare")


def test_main_section_only(vm100):
    assert vm100.vmid == 100
    assert [h.key for h in vm100.hostpci] == ["hostpci0", "hostpci1", "hostpci2", "hostpci3"]
    assert "hostpci4" not in vm100.options  # [PENDING]
    assert vm100.options["memory"] == "8192"  # not the snapshot's 2048
    assert "snaptime" not in vm100.options
    assert vm100.hookscript == "local:snippets/pvehook"
    assert vm100.description == "NVMe passthrough VM\nüber\nsecond line"
    assert not vm100.is_template


def test_hostpci_forms(vm100):
    h0, h1, h2, h3 = vm100.hostpci
    assert h0.selectors == (PciSelector(0, 1, 0, 0),)
    assert h0.options == {"host": "0000:01:00.0", "pcie": "1"}
    assert h0.mapping is None and h0.driver is None
    assert h1.selectors == (PciSelector(0, 2, 0, None),)  # whole slot
    assert h1.options["rombar"] == "0"
    assert h2.selectors == (PciSelector(0, 3, 0, 0), PciSelector(0, 3, 0, 1))
    assert h2.driver == "keep" and h2.keeps_driver
    assert h3.selectors == () and h3.mapping == "fastNvme" and h3.options["pcie"] == "1"


def test_hostpci16_is_not_a_device(vm100):
    assert vm100.options["hostpci16"] == "09:00.0"
    assert all(h.key != "hostpci16" for h in vm100.hostpci)


def test_disks(vm100):
    keys = [d.key for d in vm100.disks]
    # qemu-server's valid_drive_names order: ide, scsi, virtio, sata, efidisk0, tpmstate0
    assert keys == ["ide2", "scsi0", "scsi1", "virtio0", "sata0", "efidisk0", "tpmstate0"]
    scsi0 = vm100.disk("scsi0")
    assert scsi0.volume == "local-lvm:vm-100-disk-0"
    assert scsi0.storage == "local-lvm" and scsi0.volname == "vm-100-disk-0"
    assert scsi0.options == {"cache": "writeback", "discard": "on", "iothread": "1", "size": "32G"}
    assert not scsi0.is_cdrom
    sata0 = vm100.disk("sata0")
    assert sata0.storage is None and sata0.volname is None and sata0.is_device_path
    assert vm100.disk("ide2").is_cdrom
    assert vm100.disk("ide2").volname == "iso/debian-12.iso"
    assert vm100.disk("efidisk0").options["efitype"] == "4m"
    assert vm100.disk("unused0") is None


def test_cdrom_alias_and_none(tmp_path):
    cfg = VmConfig.load(_root(tmp_path), 101)
    assert [d.key for d in cfg.disks] == ["ide0", "ide2", "scsi0", "virtio3"]
    ide2 = cfg.disk("ide2")
    assert ide2.volume == "none" and ide2.is_cdrom and ide2.storage is None
    assert cfg.hostpci == ()  # only in [special:cloudinit] and a snapshot
    # qemu-server keeps what follows "#" verbatim, leading space included
    assert cfg.description == " only snapshot and special sections after main"


def test_disk_volume_forms():
    assert Disk.parse("scsi0", "volume=local-lvm:vm-1-disk-0,size=1G").volume == "local-lvm:vm-1-disk-0"
    # kept as written, as qemu-server does (its filename_to_volume_id is not applied)
    assert Disk.parse("scsi0", "vm-1-disk-0.qcow2").volume == "vm-1-disk-0.qcow2"
    plain = Disk.parse("scsi1", "/mnt/file.raw")
    assert plain.is_path and not plain.is_device_path and plain.storage is None
    assert Disk.parse("ide2", "cdrom,media=cdrom").is_cdrom
    assert Disk.parse("ide2", "local-lvm:vm-1-cloudinit,media=cdrom").is_cloudinit
    with pytest.raises(ConfigError, match="no volume"):
        Disk.parse("scsi0", "size=1G")


@pytest.mark.parametrize(
    "line, match",
    [
        ("hostpci0: 01:00.0,mapping=x", "both"),
        ("hostpci0: pcie=1", "either"),
        ("hostpci0: 1:00.0", "not a PCI id"),
        ("hostpci0: 01:00.0;zz:00.0", "zz:00.0"),
        ("hostpci0: 01:00.0,driver=stub", "driver"),
        ("Memory: 1", "cannot parse"),
    ],
)
def test_malformed_names_file_line_and_value(line, match):
    text = f"cores: 1\n{line}\n"
    with pytest.raises(ConfigError, match=match) as e:
        VmConfig.from_text(7, text)
    assert "qemu-server/7.conf line 2" in str(e.value)


def test_malformed_in_later_section_is_ignored():
    cfg = VmConfig.from_text(7, "cores: 1\n[PENDING]\nhostpci0: bogus\nGarbage\n")
    assert cfg.options == {"cores": "1"}


def test_template():
    cfg = VmConfig.from_text(7, "template: 1\nhostpci0: 01:00.0\n")
    assert cfg.is_template and len(cfg.hostpci) == 1


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="VM 999.*does not exist"):
        VmConfig.load(_root(tmp_path), 999)


def test_unreadable_config(tmp_path):
    root = Root(tmp_path)
    root.pve("qemu-server", "5.conf").mkdir(parents=True)  # a directory: read fails
    with pytest.raises(ConfigError, match="cannot read"):
        VmConfig.load(root, 5)


def test_hostpci_parse_direct():
    h = HostPci.parse("hostpci5", "mapping=gpu,mdev=nvidia-35")
    assert h.mdev == "nvidia-35" and h.index == 5
