"""confirm_volumes against a stand-in `lvm` (tests/unit/bin/lvm answering from
fixtures/lvm/lvs.json, lvm2 2.03's JSON) and a fake sysfs for the dm devices."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pvehook.errors import VolumeError
from pvehook.volumes import confirm_volumes, human_size, parse_size
from pvehook.vmconfig import VmConfig

HERE = Path(__file__).parent
BIN = HERE / "bin"
LVS = HERE / "fixtures" / "lvm" / "lvs.json"

STORAGE_CFG = """\
dir: local
\tpath /var/lib/vz
\tcontent iso,vztmpl,backup

lvmthin: local-lvm
\tthinpool data
\tvgname pve
\tcontent rootdir,images

lvm: thick
\tvgname vg-thick
\tcontent images

lvm: nvme-lvm
\tvgname nvme
\tcontent images

lvmthin: other-pool
\tthinpool data2
\tvgname pve
\tcontent images
"""


class FakeLvm:
    def __init__(self, tmp: Path):
        self.report = tmp / "lvs.json"
        self.calls_file = tmp / "lvm-calls"
        self.report.write_text(LVS.read_text())

    def calls(self) -> list[list[str]]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def set(self, lv_name: str, **fields: str) -> None:
        data = json.loads(self.report.read_text())
        for row in data["report"][0]["lv"]:
            if row["lv_name"] == lv_name:
                row.update(fields)
        self.report.write_text(json.dumps(data))


@pytest.fixture
def lvm(tmp_path, monkeypatch):
    fake = FakeLvm(tmp_path)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PVEHOOK_FAKE_LVM", str(fake.report))
    monkeypatch.setenv("PVEHOOK_FAKE_LVM_CALLS", str(fake.calls_file))
    return fake


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


def add_block(host, name: str, devnum: str, *, rotational: str | None = "0",
              parent: str | None = None, dm: tuple[str, str] | None = None) -> Path:
    """A block device as sysfs shows it: a disk, a partition of `parent`, or a dm device
    (dm=(name, uuid)); with /sys/class/block, /sys/block and /sys/dev/block links."""
    sys = host.sys
    if parent:
        d = host.block(parent) / name
    elif dm:
        d = sys / "devices/virtual/block" / name
    else:
        d = sys / "devices/pci0000:00/0000:00:1f.2/host0/block" / name
    d.mkdir(parents=True)
    (d / "dev").write_text(devnum + "\n")
    (d / "holders").mkdir()
    if parent:
        (d / "partition").write_text("3\n")
    else:
        (d / "queue").mkdir()
        if rotational is not None:
            (d / "queue/rotational").write_text(rotational + "\n")
        _link(sys / "block" / name, d)
    if dm:
        (d / "dm").mkdir()
        (d / "dm/name").write_text(dm[0] + "\n")
        (d / "dm/uuid").write_text(dm[1] + "\n")
    _link(sys / "class/block" / name, d)
    _link(sys / "dev/block" / devnum, d)
    host.root.dev(name).write_text("")
    return d


def stack(host, lower: str, upper: str) -> None:
    """`upper` sits on `lower` (lower/holders/upper, upper/slaves/lower)."""
    _link(host.block(lower) / "holders" / upper, host.block(upper))
    _link(host.block(upper) / "slaves" / lower, host.block(lower))


@pytest.fixture
def node(host):
    """The node of fixtures/lvm/lvs.json: VG pve on nvme0n1p3 (SSD), vg-thick on sda and
    sdb (rotating); the active LVs' dm devices at the minors LVM reports."""
    host.root.pve("storage.cfg").write_text(STORAGE_CFG)
    add_block(host, "nvme0n1", "259:0", rotational="0")
    add_block(host, "nvme0n1p3", "259:3", parent="nvme0n1")
    add_block(host, "sda", "8:0", rotational="1")
    add_block(host, "sdb", "8:16", rotational="1")
    for minor, name in ((0, "pve-data_tmeta"), (1, "pve-data_tdata"), (2, "pve-data-tpool"),
                        (3, "pve-data"), (4, "pve-vm--100--disk--0"),
                        (6, "vg--thick-vm--100--disk--2")):
        add_block(host, f"dm-{minor}", f"252:{minor}", dm=(name, f"LVM-uuid{minor}"))
    for lower, upper in (("nvme0n1p3", "dm-0"), ("nvme0n1p3", "dm-1"), ("dm-0", "dm-2"),
                         ("dm-1", "dm-2"), ("dm-2", "dm-3"), ("dm-2", "dm-4"),
                         ("sda", "dm-6"), ("sdb", "dm-6")):
        stack(host, lower, upper)
    (host.root.dev("mapper")).mkdir()
    return host


def confirm(ctx, text: str, vmid: int = 100):
    return confirm_volumes(ctx, VmConfig.from_text(vmid, text))


THIN = "scsi0: local-lvm:vm-100-disk-0,discard=on,size=32G\n"
THIN_LINE = ("scsi0 local-lvm:vm-100-disk-0 -> /dev/pve/vm-100-disk-0: raw, 32 GiB,"
             " thin pool pve/data, not in use")


# -- confirmed ----------------------------------------------------------------------

def test_confirmed_thin_lv(ctx, node, lvm):
    lines, refusals = confirm(ctx, THIN)
    assert refusals == []
    assert lines == [THIN_LINE]
    assert len(lvm.calls()) == 1  # one lvm process per start


def test_confirmed_inactive_lv(ctx, node, lvm):
    lines, refusals = confirm(ctx, "efidisk0: local-lvm:vm-100-disk-1,efitype=4m,size=4M\n")
    assert refusals == []
    assert lines == ["efidisk0 local-lvm:vm-100-disk-1 -> /dev/pve/vm-100-disk-1: raw, 4 MiB,"
                     " thin pool pve/data, inactive (Proxmox activates it at start)"]


def test_thick_lv_with_two_segments_one_call_for_all_vgs(ctx, node, lvm):
    lines, refusals = confirm(ctx, THIN + "scsi1: thick:vm-100-disk-2,size=16G\n"
                                          "tpmstate0: local-lvm:vm-100-disk-1,size=4M\n")
    assert refusals == []
    assert lines[0] == THIN_LINE
    assert ("scsi1 thick:vm-100-disk-2 -> /dev/vg-thick/vm-100-disk-2: raw, 16 GiB,"
            " volume group vg-thick, not in use") in lines
    assert any(line.startswith("tpmstate0 ") for line in lines)
    assert len(lvm.calls()) == 1  # one lvm process for the disks of both volume groups


# -- refused ------------------------------------------------------------------------

def only_refusal(lines, refusals) -> str:
    assert len(refusals) == 1, refusals
    assert isinstance(refusals[0], VolumeError) and refusals[0].exit_code == 15
    return str(refusals[0])


def test_lv_missing(ctx, node, lvm):
    lines, refusals = confirm(ctx, THIN + "scsi1: local-lvm:vm-100-disk-9,size=8G\n")
    msg = only_refusal(lines, refusals)
    assert msg.startswith("scsi1 local-lvm:vm-100-disk-9: /dev/pve/vm-100-disk-9 does not exist")
    assert "lvs pve" in msg  # the next step
    assert lines == [THIN_LINE]  # the other disk is still confirmed


def test_volume_group_missing(ctx, node, lvm):
    lines, refusals = confirm(ctx, THIN + "scsi1: nvme-lvm:vm-100-disk-0\n")
    msg = only_refusal(lines, refusals)
    assert "volume group 'nvme' of storage 'nvme-lvm' is not available" in msg
    assert 'Volume group "nvme" not found' in msg
    assert lines == [THIN_LINE]  # the VG that exists is still read, in the same call
    assert len(lvm.calls()) == 1


def test_not_in_the_storages_thin_pool(ctx, node, lvm):
    msg = only_refusal(*confirm(ctx, "scsi0: other-pool:vm-100-disk-0\n"))
    assert "not a thin volume of the storage's pool pve/data2 (it is in pool data)" in msg


def test_qcow2_volume_on_lvm(ctx, node, lvm):
    msg = only_refusal(*confirm(ctx, "scsi0: nvme-lvm:vm-100-disk-0.qcow2,size=8G\n"))
    assert "a qcow2 volume on LVM storage 'nvme-lvm', not RAW" in msg
    assert "qm disk move 100 scsi0 nvme-lvm --format raw" in msg
    assert lvm.calls() == []  # refused from the names alone


def test_format_qcow2_in_config(ctx, node, lvm):
    lines, refusals = confirm(ctx, "scsi0: local-lvm:vm-100-disk-0,format=qcow2,size=32G\n")
    msg = only_refusal(lines, refusals)
    assert "format=qcow2 in the VM config" in msg and "remove format=qcow2" in msg
    assert confirm(ctx, "scsi0: local-lvm:vm-100-disk-0,format=raw,size=32G\n")[1] == []


def test_lv_open(ctx, node, lvm):
    lvm.set("vm-100-disk-0", lv_device_open="open")
    msg = only_refusal(*confirm(ctx, THIN))
    assert "(/dev/pve/vm-100-disk-0): the host uses it: open by a process" in msg
    assert "fuser" in msg


def test_lv_mounted(ctx, node, lvm):
    node.mount("dm-4", "/mnt/scratch")
    lvm.set("vm-100-disk-0", lv_device_open="open")
    msg = only_refusal(*confirm(ctx, THIN))
    assert "the host uses it: mounted at /mnt/scratch" in msg
    assert "open by a process" not in msg  # the mount explains the open count


def test_lv_swap(ctx, node, lvm):
    with open(node.root.proc("swaps"), "a") as f:
        f.write("/dev/dm-4\t\tpartition\t1048572\t\t0\t\t-2\n")
    assert "active swap" in only_refusal(*confirm(ctx, THIN))


@pytest.mark.parametrize("uuid, kind", [
    ("LVM-guestvguuidguestlvuuid", "an active LVM volume"),
    ("part1-LVM-uuid4", "a partition mapping (kpartx)"),
])
def test_vg_activated_on_top(ctx, node, lvm, uuid, kind):
    # The host's LVM found the guest's PV on the LV and activated its VG (or kpartx mapped
    # its partitions); the guest's root LV is mounted on the host, too.
    add_block(node, "dm-7", "252:7", dm=("guestvg-root", uuid))
    stack(node, "dm-4", "dm-7")
    node.mount("dm-7", "/mnt/guest")
    lvm.set("vm-100-disk-0", lv_device_open="open")
    msg = only_refusal(*confirm(ctx, THIN))
    assert f"held by dm-7 (guestvg-root), {kind}" in msg
    assert "mounted at /mnt/guest through dm-7 (guestvg-root)" in msg
    assert "vgchange -an" in msg


def test_active_lv_without_dm_device(ctx, node, lvm):
    lvm.set("vm-100-disk-0", lv_kernel_minor="40")
    assert "no such device in sysfs" in only_refusal(*confirm(ctx, THIN))


def test_lvm_not_installed(ctx, node, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "cannot run lvm" in only_refusal(*confirm(ctx, THIN))


# -- warnings and notes -------------------------------------------------------------

def test_smaller_than_size_is_a_warning(ctx, node, lvm):
    lines, refusals = confirm(ctx, "scsi0: local-lvm:vm-100-disk-0,discard=on,size=64G\n")
    assert refusals == []
    assert lines[0] == THIN_LINE
    assert lines[1].startswith("warning: scsi0 local-lvm:vm-100-disk-0: the LV is 32 GiB,"
                               " smaller than size=64G in the VM config")
    assert len(lines) == 2
    # larger than size= (rounded up to extents, grown on the host) is fine
    assert confirm(ctx, "scsi0: local-lvm:vm-100-disk-0,discard=on,size=31G\n")[0] == [THIN_LINE]


def test_notes_writeback_and_discard_on_ssd(ctx, node, lvm):
    lines, refusals = confirm(ctx, "scsi0: local-lvm:vm-100-disk-0,cache=writeback,size=32G\n"
                                   "scsi1: thick:vm-100-disk-2,size=16G\n")
    assert refusals == []
    notes = [line for line in lines if line.startswith("note: ")]
    assert len(notes) == 2
    assert notes[0].startswith("note: scsi0: cache=writeback needs protected power")
    assert "power loss can lose writes" in notes[0]
    # the thin LV sits on nvme0n1p3 (rotational 0, read from its disk's queue) through
    # its pool's hidden data LV; the thick LV on rotating sda+sdb gets no discard note
    assert notes[1].startswith("note: scsi0: discard=on is not set, but the volume is on SSD"
                               " (nvme0n1p3)")
    assert "thin pool keeps the freed space" in notes[1]


def test_no_discard_note_when_one_pv_rotates(ctx, node, lvm):
    (node.block("sda") / "queue/rotational").write_text("0\n")
    lines, _ = confirm(ctx, "scsi1: thick:vm-100-disk-2,size=16G\n")
    assert not any("discard" in line for line in lines)
    (node.block("sdb") / "queue/rotational").write_text("0\n")
    lines, _ = confirm(ctx, "scsi1: thick:vm-100-disk-2,size=16G\n")
    assert any("on SSD (sda, sdb)" in line for line in lines)


# -- no LVM disks: no lvm call ------------------------------------------------------

def test_no_lvm_call_without_lvm_disks(ctx, node, lvm):
    text = ("scsi0: local:100/vm-100-disk-0.raw,size=8G\n"
            "sata0: /dev/disk/by-id/nvme-Samsung_SSD_980_PRO_1TB_S5GXNX0T123456A\n"
            "ide2: local-lvm:vm-100-cloudinit,media=cdrom\n"
            "ide0: none,media=cdrom\n"
            "hostpci0: 0000:01:00.0,pcie=1\n")
    assert confirm(ctx, text) == ([], [])
    assert confirm(ctx, "hostpci0: 0000:01:00.0\n") == ([], [])
    assert lvm.calls() == []
    assert not lvm.calls_file.exists()


def test_unknown_storage_is_left_to_proxmox(ctx, node, lvm):
    lines, refusals = confirm(ctx, "scsi0: gone:vm-100-disk-0\n")
    assert refusals == [] and lines == ["scsi0 gone:vm-100-disk-0: storage 'gone' is not in"
                                        " storage.cfg, not checked"]
    assert lvm.calls() == []


# -- the pieces ---------------------------------------------------------------------

@pytest.mark.parametrize("value, size", [
    ("32G", 32 << 30), ("528K", 528 << 10), ("4M", 4 << 20), ("4MiB", 4 << 20),
    ("1.5T", 3 << 39), ("1024", 1024), ("0.5G", 1 << 29),
    ("32g", None), ("32GB", None), ("", None), ("-1G", None),
])
def test_parse_size(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize("n, text", [
    (32 << 30, "32 GiB"), (4 << 20, "4 MiB"), (528 << 10, "528 KiB"),
    ((63 << 29), "31.5 GiB"), (512, "512 B"), (1 << 40, "1 TiB"),
])
def test_human_size(n, text):
    assert human_size(n) == text
