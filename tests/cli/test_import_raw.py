"""import-raw against the stand-in pvesh (real proxmoxer, real subprocesses) on the fake host."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from fakesys import FakeNamespace

A = "0000:01:00.0"
VOL = "local:snippets/pvehook-hook"
STORAGE = """\
dir: local
\tpath /var/lib/vz
\tcontent iso,vztmpl,backup,snippets

lvmthin: local-lvm
\tthinpool data
\tvgname pve
\tcontent rootdir,images

lvm: thick
\tvgname big
\tcontent images

dir: images
\tpath /srv/images
\tcontent images
"""
DATA = os.urandom(3 << 20)
BY_ID = "/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_SA"


@pytest.fixture
def seed(cluster):
    """VM 100 (stopped) and an NVMe disk nvme0n1 (3 MiB of data, one partition), by-id link."""
    cluster.storage(STORAGE)
    cluster.vm(100, "memory: 2048\nname: seed\n")
    host = cluster.host
    host.add_pci(A, group=1, serial="SA", namespaces=[FakeNamespace(partitions=1)])
    (host.block("nvme0n1") / "size").write_text(f"{len(DATA) // 512}\n")
    host.root.dev("nvme0n1").write_bytes(DATA)
    link = host.root.dev("disk/by-id/nvme-QEMU_NVMe_Ctrl_SA")
    link.parent.mkdir(parents=True)
    link.symlink_to("../../nvme0n1")
    return cluster


def lv(cluster, name, vg="pve"):
    return cluster.host.root.dev(vg, name)


def test_imports_attaches_and_registers(seed, cli):
    code, out, err = cli("import-raw", 100, BY_ID, "local-lvm")
    assert code == 0, err
    assert f"source /dev/nvme0n1 (from {BY_ID}): whole disk, 3 MiB, not used by the host" in out
    assert "storage local-lvm: lvmthin, volume group pve, thin pool data" in out
    assert '  Logical volume "vm-100-disk-0" created.' in out
    assert "  transferred 0.0 B of 3.0 MiB (0.00%)" in out
    assert "  transferred 3.0 MiB of 3.0 MiB (100.00%)" in out
    disk = "local-lvm:vm-100-disk-0,cache=writeback,discard=on,size=3M"
    assert f"  scsi0: successfully created disk '{disk}'" in out
    assert f"VM 100: scsi0: {disk}" in out
    assert "VM 100 on pve1: registered" in out
    assert "note: scsi0: cache=writeback needs protected power" in out
    conf = seed.conf(100)
    assert f"scsi0: {disk}\n" in conf and f"hookscript: {VOL}\n" in conf
    assert "import-from" not in conf
    assert lv(seed, "vm-100-disk-0").read_bytes() == DATA
    # the one request that imports, exactly as Proxmox wants it
    assert ["pvesh", "create", "/nodes/pve1/qemu/100/config", "-scsi0",
            "local-lvm:0,import-from=/dev/nvme0n1,format=raw,cache=writeback,discard=on",
            "--output-format", "json"] in seed.calls()
    status = [c for c in seed.calls() if c[1] == "get" and c[2].endswith("/status")
              and "/tasks/UPID:pve1:" in c[2]]
    assert len(status) == 1  # a foreground task has ended when pvesh returns

    # a second disk: the next free name, other options
    seed.host.root.dev("nvme0n1").write_bytes(DATA[::-1])
    code, out, err = cli("import-raw", 100, "/dev/nvme0n1", "local-lvm", "--bus", "virtio1",
                         "--cache", "none", "--no-discard")
    assert code == 0, err
    assert "virtio1: local-lvm:vm-100-disk-1,cache=none,size=3M\n" in seed.conf(100)
    assert lv(seed, "vm-100-disk-1").read_bytes() == DATA[::-1]
    assert "VM 100 on pve1: unchanged" in out


def test_dry_run_changes_nothing(seed, cli):
    seed.vm(100, "memory: 2048\nboot: order=ide2;net0\n")
    code, out, err = cli("import-raw", 100, BY_ID, "thick", "--dry-run")
    assert code == 0, err
    assert "`qm set 100 --boot order=scsi0;ide2;net0`" in out
    assert "storage thick: lvm, volume group big" in out
    assert ("would run: pvesh create /nodes/pve1/qemu/100/config -scsi0"
            " thick:0,import-from=/dev/nvme0n1,format=raw,cache=writeback,discard=on") in out
    assert f"would register the hookscript {VOL} on VM 100" in out
    assert "dry run: nothing changed" in out
    assert seed.writes() == []
    assert not lv(seed, "vm-100-disk-0", "big").exists()
    code, out, err = cli("import-raw", 100, BY_ID, "thick", "--dry-run", "--json")
    data = json.loads(out)
    assert (code, data["dry_run"], data["size_bytes"], data["device"]) == (0, True, len(DATA),
                                                                            "/dev/nvme0n1")


def test_refuses_a_running_or_busy_vm(seed, cli):
    seed.host.root.run("qemu-server", "100.pid").write_text(f"{os.getpid()}\n")
    code, out, err = cli("import-raw", 100, BY_ID, "local-lvm")
    assert code == 16
    assert "VM 100 is running" in err and "qm shutdown 100" in err
    seed.host.root.run("qemu-server", "100.pid").unlink()
    seed.vm(100, "memory: 2048\nlock: backup\n")
    code, out, err = cli("import-raw", 100, BY_ID, "local-lvm")
    assert code == 16 and "VM 100 is locked (backup)" in err
    seed.vm(101, node="pve2")
    code, out, err = cli("import-raw", 101, BY_ID, "local-lvm")
    assert code == 16 and "VM 101 lives on node pve2, the disk /dev/nvme0n1 on pve1" in err
    code, out, err = cli("import-raw", 555, BY_ID, "local-lvm")
    assert code == 6
    assert seed.writes() == []


def test_refuses_a_storage_that_is_not_lvm(seed, cli):
    code, out, err = cli("import-raw", 100, BY_ID, "images")
    assert code == 7
    assert "storage 'images' is of type dir, not lvm or lvmthin" in err
    assert "local-lvm, thick" in err and "qm disk import" in err
    code, out, err = cli("import-raw", 100, BY_ID, "nope")
    assert code == 7 and "storage 'nope' does not exist" in err
    seed.storage(STORAGE.replace("\tcontent images\n\ndir", "\tcontent rootdir\n\ndir"))
    code, out, err = cli("import-raw", 100, BY_ID, "thick")
    assert code == 7 and "pvesm set thick --content rootdir,images" in err
    assert seed.writes() == []


@pytest.mark.parametrize("use", ["mount", "swap", "holder", "system"])
def test_refuses_a_disk_the_host_uses(seed, cli, use):
    host = seed.host
    if use == "mount":
        host.mount("nvme0n1p1", "/srv")
        why = "nvme0n1p1 is mounted at /srv"
    elif use == "swap":
        host.swapon("nvme0n1p1")
        why = "nvme0n1p1 is active swap"
    elif use == "holder":
        host.hold("nvme0n1")
        why = "nvme0n1 is held by dm-0 (vg0-lv0), an active LVM volume"
    else:
        host.mount("nvme0n1p1", "/boot")
        why = "nvme0n1p1 holds /boot: it is the host's own system disk"
    code, out, err = cli("import-raw", 100, BY_ID, "local-lvm")
    assert code == 11, err
    assert f"the host uses /dev/nvme0n1: {why}" in err
    assert err.count("\n") == 1
    assert seed.writes() == [] and "scsi0" not in seed.conf(100)


def test_refuses_what_is_not_a_whole_disk(seed, cli):
    code, out, err = cli("import-raw", 100, "/dev/nvme0n1p1", "local-lvm")
    assert code == 2
    assert "is the partition nvme0n1p1 of /dev/nvme0n1, not a whole disk" in err
    assert "pass the whole disk /dev/nvme0n1" in err
    img = seed.host.base / "root.img"
    img.write_bytes(b"\0" * 512)
    code, out, err = cli("import-raw", 100, str(img).replace(str(seed.host.base), ""), "local-lvm")
    assert code == 2 and "is a file, not a block device" in err and "qm disk import" in err
    code, out, err = cli("import-raw", 100, "/dev/disk/by-id/nvme-gone", "local-lvm")
    assert code == 2 and "does not exist" in err and "/dev/nvme0n1" in err
    code, out, err = cli("import-raw", 100, "nvme0n1", "local-lvm")
    assert code == 2 and "pass /dev/nvme0n1" in err
    code, out, err = cli("import-raw", 100, "/dev/disk", "local-lvm")
    assert code == 2 and "is a directory" in err
    assert seed.writes() == []


def test_refuses_a_disk_that_qemu_img_would_not_read_raw(seed, cli):
    seed.host.root.dev("nvme0n1").write_bytes(b"QFI\xfb\0\0\0\3" + DATA[8:])
    code, out, err = cli("import-raw", 100, BY_ID, "local-lvm")
    assert code == 17
    assert "starts with a qcow2/qcow header" in err and "qemu-img convert -p -f raw" in err
    assert seed.writes() == []


def test_slot_taken_and_other_hookscript(seed, cli):
    seed.vm(100, "memory: 2048\nscsi0: local-lvm:vm-100-disk-7,size=1G\n"
                 "hookscript: local:snippets/mine.sh\n")
    code, out, err = cli("import-raw", 100, BY_ID, "local-lvm")
    assert code == 2 and "VM 100 already has scsi0" in err and "--bus scsi1" in err
    code, out, err = cli("import-raw", 100, BY_ID, "local-lvm", "--bus", "scsi1")
    assert code == 8 and "local:snippets/mine.sh" in err and "pass --no-register" in err
    assert seed.writes() == []
    code, out, err = cli("import-raw", 100, BY_ID, "local-lvm", "--bus", "scsi1", "--no-register")
    assert code == 0, err
    assert "scsi1: local-lvm:vm-100-disk-0,cache=writeback,discard=on,size=3M" in seed.conf(100)
    assert "hookscript: local:snippets/mine.sh" in seed.conf(100)
    code, out, err = cli("import-raw", 100, BY_ID, "local-lvm", "--bus", "efidisk0")
    assert code == 2 and "not a disk slot" in err


def test_a_failed_copy_attaches_nothing(seed, cli, monkeypatch):
    monkeypatch.setenv("FAKEPVE_IMPORT_FAIL", "50")
    code, out, err = cli("import-raw", 100, BY_ID, "local-lvm")
    assert code == 1
    assert "transferred 1.0 MiB of 3.0 MiB (33.33%)" in out
    assert "the import task failed: copy failed: command '/usr/bin/qemu-img convert" in err
    assert "nothing was attached" in err and "/tasks/UPID:pve1:" in err
    assert "scsi0" not in seed.conf(100) and "hookscript" not in seed.conf(100)
    assert not lv(seed, "vm-100-disk-0").exists()


def test_a_task_in_the_background_is_polled(seed, cli, monkeypatch):
    import pvehook.cli.importraw as ir

    monkeypatch.setattr(ir, "POLL_MIN", 0.05)
    monkeypatch.setattr(ir, "POLL_MAX", 0.1)
    monkeypatch.setenv("FAKEPVE_TASK_ASYNC", "1")
    monkeypatch.setenv("FAKEPVE_TASK_DELAY", "0.05")
    code, out, err = cli("import-raw", 100, BY_ID, "local-lvm", "--json")
    assert code == 0, err
    progress = [line for line in err.splitlines() if "transferred" in line]
    assert progress[0] == "  transferred 0.0 B of 3.0 MiB (0.00%)"
    assert progress[-1] == "  transferred 3.0 MiB of 3.0 MiB (100.00%)"
    assert len(progress) == len(set(progress)) == 4  # each line once
    assert "TASK OK" in err
    data = json.loads(out)
    assert data["exitstatus"] == "OK" and data["volume"] == "local-lvm:vm-100-disk-0"
    assert data["registered"]["vms"][0]["action"] == "registered"
    logs = [c for c in seed.calls() if c[2].endswith("/log")]
    assert len(logs) >= 2 and all("-limit" in c and c[c.index("-limit") + 1] == "0" for c in logs)


def pvesh(*args):
    p = subprocess.run(["pvesh", *args, "--output-format", "json"], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def test_shapes_of_the_stand_in_tasks(seed):
    code, out, err = pvesh("create", "/nodes/pve1/qemu/100/config", "-scsi0",
                           "local-lvm:8,import-from=/dev/nvme0n1")
    assert (code, err) == (255, "400 Parameter verification failed.\nscsi0: 'import-from'"
                                " requires special syntax - use <storage ID>:0,import-from=<source>\n")
    code, out, err = pvesh("create", "/nodes/pve1/qemu/100/config", "-scsi0",
                           "local-lvm:0,import-from=/dev/nope")
    assert (code, err) == (255, "can't find file '/dev/nope'\n")
    code, out, err = pvesh("get", "/nodes/pve1/qemu/100/status/current")
    assert json.loads(out)["status"] == "stopped"
    code, out, err = pvesh("create", "/nodes/pve1/qemu/100/config", "-scsi0",
                           "local-lvm:0,import-from=/dev/nvme0n1,format=raw")
    assert code == 0 and err == ""
    *task, last = out.splitlines()
    upid = json.loads(last)
    assert upid.startswith("UPID:pve1:") and upid.endswith(":qmconfig:100:root@pam:")
    assert task[0] == '  Logical volume "vm-100-disk-0" created.'
    code, out, _ = pvesh("get", f"/nodes/pve1/tasks/{upid}/status")
    st = json.loads(out)
    assert (st["status"], st["exitstatus"], st["type"], st["id"]) == (
        "stopped", "OK", "qmconfig", "100")
    code, out, _ = pvesh("get", f"/nodes/pve1/tasks/{upid}/log", "-start", "1", "-limit", "2")
    assert json.loads(out) == [{"n": 2, "t": "transferred 0.0 B of 3.0 MiB (0.00%)"},
                               {"n": 3, "t": "transferred 1.0 MiB of 3.0 MiB (33.33%)"}]
    code, out, err = pvesh("get", "/nodes/pve1/tasks/UPID:nope/status")
    assert err.startswith("400 Parameter verification failed.\nupid: unable to parse")


# -- the source controller's lock, the header check ---------------------------------------

HOOK_ON_TREE = """
import sys
from fakesys import FakeHost, FakeKernel
from pvehook.context import Context
from pvehook.hook import run
host = FakeHost.reopen(sys.argv[1])
sys.exit(run(sys.argv[2:], Context(root=host.root, kernel=FakeKernel(host), node="pve1")))
"""


def test_no_vm_takes_the_disk_mid_copy(seed, cli, monkeypatch, tmp_path):
    """VM 101 passes the source's controller and starts while the copy runs: its
    pre-start finds the controller locked (import-raw holds the lock the hook takes,
    through filelock) and refuses; the disk stays on nvme and is copied whole. Once
    the copy is over, the same start goes through."""
    import sys

    host = seed.host
    seed.vm(101, f"memory: 512\nhostpci0: {A}\n")
    host.vm_config(101, f"memory: 512\nhostpci0: {A}\n")
    script = tmp_path / "hook.py"
    script.write_text(HOOK_ON_TREE)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    monkeypatch.setenv("PYTHONPATH", f"{repo}{os.pathsep}{repo}/tests")
    monkeypatch.setenv("PVEHOOK_TIMEOUT_LOCK", "0.3")
    start = f"{sys.executable} {script} {host.base} 101 pre-start"
    monkeypatch.setenv("FAKEPVE_DURING_COPY", f"{start}; echo hook exit $?; readlink"
                       f" {host.device_dir(A)}/driver")
    code, out, err = cli("import-raw", 100, BY_ID, "local-lvm", "--no-register")
    assert code == 0, err
    assert f"{A} is locked by another pvehook run" in out
    assert "hook exit 12" in out
    assert out.split("hook exit 12")[1].split()[0].endswith("/nvme")  # not moved mid-copy
    assert lv(seed, "vm-100-disk-0").read_bytes() == DATA
    p = subprocess.run(start.split(), capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert host.driver_of(A) == "vfio-pci"


def test_a_start_holding_the_lock_keeps_import_raw_out(seed, cli, monkeypatch):
    """The other way round: the hook's lock (flock) held, import-raw (filelock) waits,
    then refuses with the controller named; nothing is requested from Proxmox."""
    from pvehook.records import device_locks

    monkeypatch.setenv("PVEHOOK_TIMEOUT_LOCK", "0.2")
    with device_locks(seed.host.root, [A], timeout=1):
        code, out, err = cli("import-raw", 100, BY_ID, "local-lvm", "--no-register")
    assert code == 12, err
    assert f"its controller {A} is locked by a pvehook run" in err
    assert not any(c[:2] == ["pvesh", "create"] for c in seed.calls())
    assert not lv(seed, "vm-100-disk-0").exists()


def test_an_unreadable_first_sector_fails_the_header_check(tmp_path):
    """A source whose first sector cannot be read fails the check instead of passing as
    header-free (the fake tree's device nodes are files: here a directory and a missing
    node stand for a disk that returns an error)."""
    from pvehook.cli.importraw import image_header
    from pvehook.errors import ImageHeaderError

    for path in (tmp_path, tmp_path / "gone"):
        with pytest.raises(ImageHeaderError, match=f"cannot read the first sector of {path}"):
            image_header(path)
    (tmp_path / "disk").write_bytes(b"\0" * 512)
    assert image_header(tmp_path / "disk") is None
