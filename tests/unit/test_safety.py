"""Safety of the hook's own state: a hook killed after its record, forked writers and
locks, records that are corrupt, stale or from another boot, lock and record
directories someone else made, odd vmids. What the tree shows afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fakesys import nvme, record
from pvehook.errors import HeldByOtherVMError
from pvehook.records import device_locks

A = "0000:01:00.0"
B = "0000:02:00.0"
REPO = Path(__file__).resolve().parent.parent.parent
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}

# The hook in a process of its own on a fake tree, with the fake kernel doing its writes
# (hooks/pvehook-hook with PVEHOOK_ROOT would write to the tree's plain files).
HOOK_ON_TREE = """
import sys
from fakesys import FakeHost, FakeKernel
from pvehook.context import Context
from pvehook.hook import run
host = FakeHost.reopen(sys.argv[1])
sys.exit(run(sys.argv[2:], Context(root=host.root, kernel=FakeKernel(host), node="pve1")))
"""


def override(host, addr):
    return (host.device_dir(addr) / "driver_override").read_text().strip()


def wait_gone(pid: int) -> None:
    """Wait until a process that is not our child has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        import select

        select.select([fd], [], [])
    finally:
        os.close(fd)


# -- a hook killed between its record and its first write ----------------------------------

@pytest.mark.parametrize("op, driver", [("override", "vfio-pci"), ("unbind", "nvme")])
def test_hook_killed_after_the_record_then_post_stop_restores(host, hook, op, driver):
    """SIGKILL of a real hook process, its first write (driver_override, or the unbind
    after it) held at a gate in the fake kernel: the record is already there, and
    post-stop gives the device back with nothing left over."""
    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    host.fault(A, op, "gate", "first", driver=driver)
    proc = subprocess.Popen([sys.executable, "-c", HOOK_ON_TREE, str(host.base), "100",
                             "pre-start"], env=ENV, stdout=subprocess.DEVNULL)
    try:
        host.gate("first")
    finally:
        proc.kill()
        assert proc.wait() == -9
    rec = record(host, 100)
    assert rec is not None, "no record before the first write"
    assert [(d["address"], d["original_driver"]) for d in rec["devices"]] == [(A, "nvme")]
    assert host.driver_of(A) == "nvme"
    assert override(host, A) == ("(null)" if op == "override" else "vfio-pci")
    # A write the kernel was still doing goes on without the hook (a forked writer).
    writer = int((host.fake / "at-first").read_text())
    host.open_gate("first")
    wait_gone(writer)

    code, out = hook(100, "post-stop")
    assert code == 0, out
    assert host.driver_of(A) == "nvme"
    assert override(host, A) == "(null)"
    assert len(host.namespaces_of(A)) == 3
    assert record(host, 100) is None


def test_a_stuck_writer_keeps_only_its_own_device_locked(host, hook, ctx):
    """B's unbind never returns: the run fails, A is given back and its lock is free;
    only B stays locked, by the writer still in the kernel, until that write ends."""
    nvme(host, A, group=1)
    nvme(host, B, group=2)
    host.fault(B, "unbind", "gate", "b", driver="nvme")
    host.vm_config(100, f"hostpci0: {A}\nhostpci1: {B}\n")
    ctx.timeouts = ctx.timeouts._replace(rebind=3)
    code, out = hook(100, "pre-start")
    assert code == 13, out
    assert f"the kernel is still busy with {B}" in out
    assert host.driver_of(A) == "nvme"
    with device_locks(host.root, [A], timeout=0):  # free at once
        pass
    with pytest.raises(HeldByOtherVMError):
        with device_locks(host.root, [B], timeout=0):
            pass
    host.open_gate("b")
    code, out = hook(100, "post-stop")  # waits for B's lock, then gives B back
    assert code == 0, out
    assert host.driver_of(B) == "nvme"
    assert record(host, 100) is None


# -- records ---------------------------------------------------------------------------------

def test_a_corrupt_record_holds_what_it_names_and_nothing_else(host, hook):
    nvme(host, A, group=1)
    nvme(host, B, group=2)
    host.root.state_dir.mkdir(parents=True, mode=0o700)
    bad = host.root.state_dir / "200.json"
    bad.write_text('{"vmid": 200, "devices": [{"address": "0000:01:00.0", "original_dr')
    host.vm_config(100, f"hostpci0: {B}\n")
    host.vm_config(101, f"hostpci0: {A}\n")

    code, out = hook(100, "pre-start")  # B: not named by it
    assert code == 0, out
    assert f"{bad} (VM 200) cannot be read" in out
    assert host.driver_of(B) == "vfio-pci"

    code, out = hook(101, "pre-start")  # A: named by it
    assert code == 12, out
    assert f"{A} is held by VM 200, going by {bad}" in out
    assert "Traceback" not in out
    assert host.driver_of(A) == "nvme"


def test_status_and_check_name_a_corrupt_record(host, ctx):
    from pvehook.cli.status import check_data, status_data

    nvme(host, A, group=1)
    host.root.state_dir.mkdir(parents=True, mode=0o700)
    (host.root.state_dir / "200.json").write_text("\0\0garbage 0000:01:00.0")
    host.vm_config(100, f"hostpci0: {A}\n")
    [item] = status_data(ctx)
    assert "200.json" in item["held_by"]
    data = check_data(ctx, 100)
    assert data["exit_code"] == 12
    assert any("200.json" in line for line in data["lines"])


def test_post_stop_with_its_own_record_corrupt_names_it(host, hook):
    nvme(host)
    host.root.state_dir.mkdir(parents=True, mode=0o700)
    (host.root.state_dir / "100.json").write_text("[1, 2")
    code, out = hook(100, "post-stop")
    assert code == 1
    assert f"{host.root.state_dir / '100.json'} (VM 100) cannot be read (not JSON)" in out
    assert "Traceback" not in out


def test_a_stale_record_is_stale_for_every_device_it_names(host, hook, ctx, monkeypatch):
    """VM 200 stopped without post-stop; its device went back to nvme by hand. When VM 100
    takes it, it leaves VM 200's record too: a late post-stop of VM 200 must not give
    it back to the host under VM 100."""
    import pvehook.holds
    from pvehook import rebind
    from pvehook.pci import PciAddress, PciDevice
    from pvehook.pins import accept

    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    host.vm_config(200, f"hostpci0: {A}\n")
    assert hook(200, "pre-start")[0] == 0
    assert rebind.move(ctx.kernel, [(PciDevice(host.root, PciAddress.parse(A)), "nvme")],
                       keep_override=False) == {}
    assert host.driver_of(A) == "nvme" and record(host, 200) is not None
    monkeypatch.setattr(pvehook.holds, "RECORD_GRACE_S", 0.0)  # and VM 200 never ran
    accept(ctx, 100)  # VM 200's pinned drive: VM 100 shares it only when told to
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert host.driver_of(A) == "vfio-pci"
    assert record(host, 200) is None
    assert hook(200, "post-stop")[0] == 0  # late, or run by hand
    assert host.driver_of(A) == "vfio-pci"  # still VM 100's


def test_the_grace_period_does_not_move_with_the_wall_clock(host, hook, monkeypatch):
    """An NTP step right after VM 200's pre-start: its record still holds the device."""
    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    host.vm_config(200, f"hostpci0: {A}\n")
    assert hook(200, "pre-start")[0] == 0
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    code, out = hook(100, "pre-start")
    assert code == 12 and "VM 200" in out


def test_a_record_of_another_boot_is_stale(host, hook):
    boot = host.root.proc("sys/kernel/random/boot_id")
    boot.parent.mkdir(parents=True, exist_ok=True)
    boot.write_text("11111111-1111-1111-1111-111111111111\n")
    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    host.vm_config(200, f"hostpci0: {A}\n")
    assert hook(200, "pre-start")[0] == 0
    assert hook(100, "pre-start")[0] == 12  # same boot, in its grace period
    boot.write_text("22222222-2222-2222-2222-222222222222\n")
    code, out = hook(100, "pre-start")
    assert code == 0 and "taken over" in out, out
    assert record(host, 200) is None


# -- directories and files that are not ours ---------------------------------------------------

def test_directories_are_root_only(host, hook):
    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0
    for d in (host.root.state_dir, host.root.lock_dir):
        st = d.lstat()
        assert (st.st_uid, oct(st.st_mode & 0o7777)) == (os.geteuid(), "0o700")


def test_a_wider_directory_of_ours_is_narrowed(host, hook):
    host.root.state_dir.mkdir(parents=True, mode=0o755)
    os.chmod(host.root.state_dir, 0o755)  # as an older pvehook made it
    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0
    assert oct(host.root.state_dir.stat().st_mode & 0o777) == "0o700"


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


@needs_root
@pytest.mark.parametrize("which", ["state", "locks"])
def test_a_directory_of_another_user_is_refused_and_left_alone(host, hook, which):
    d = host.root.state_dir if which == "state" else host.root.lock_dir
    d.mkdir(parents=True, mode=0o700)
    os.chown(d, 65534, 65534)
    (d / "x").write_text("theirs")
    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 1, out
    assert f"{d} belongs to" in out and "uid 65534" in out and f"rm -rf {d}" in out
    assert host.driver_of(A) == "nvme"
    assert sorted(os.listdir(d)) == ["x"] and d.stat().st_uid == 65534


@needs_root
@pytest.mark.parametrize("name", [f"{A}.lock", "100.json"])
def test_a_file_of_another_user_is_refused(host, hook, name):
    host.root.lock_dir.mkdir(parents=True)
    os.chmod(host.root.state_dir, 0o700)
    os.chmod(host.root.lock_dir, 0o700)
    f = (host.root.lock_dir if name.endswith(".lock") else host.root.state_dir) / name
    content = "" if name.endswith(".lock") else '{"vmid": 100, "devices": []}'
    f.write_text(content)
    os.chown(f, 65534, 65534)
    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 1, out
    assert str(f) in out
    assert host.driver_of(A) == "nvme"
    assert f.read_text() == content and f.stat().st_uid == 65534


@pytest.mark.parametrize("which", ["state", "locks", "lock file", "record"])
def test_links_are_never_followed(host, hook, tmp_path, which):
    """A link where a directory, lock or record belongs: refused; its target is
    neither created nor written."""
    state, locks = host.root.state_dir, host.root.lock_dir
    if which in ("lock file", "record"):
        locks.mkdir(parents=True)
        os.chmod(state, 0o700)
        os.chmod(locks, 0o700)
    elif which == "locks":
        state.mkdir(parents=True, mode=0o700)
    link = {"state": state, "locks": locks, "lock file": locks / f"{A}.lock",
            "record": state / "100.json"}[which]
    target = tmp_path / "victim"
    if which in ("state", "locks"):
        target.mkdir()
    link.symlink_to(target)
    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 1, out
    assert str(link) in out
    assert host.driver_of(A) == "nvme"
    if which in ("state", "locks"):
        assert os.listdir(target) == []
    else:
        assert not target.exists()


def test_a_planted_run_lock_pvehook_is_not_used(host, hook, tmp_path):
    """The old place, /run/lock/pvehook (world-writable parent): whatever is planted
    there is neither followed nor waited for."""
    planted = host.root.run("lock", "pvehook")
    planted.mkdir(parents=True)
    target = tmp_path / "victim"
    (planted / f"{A}.lock").symlink_to(target)
    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0
    assert not target.exists()
    assert host.driver_of(A) == "vfio-pci"


# -- vmids -----------------------------------------------------------------------------------

@pytest.mark.parametrize("vmid", ["²", "١٢٣", "１２３", "099", "99", "1000000000", "+123",
                                  " 123", "123\n", "1_000"])
def test_odd_vmids_are_usage_errors(host, ctx, capsys, vmid):
    from pvehook.hook import run

    nvme(host)
    host.vm_config(123, f"hostpci0: {A}\n")
    assert run([vmid, "pre-start"], ctx) == 2
    err = capsys.readouterr().err
    assert "malformed vmid" in err and "Traceback" not in err
    assert host.driver_of(A) == "nvme"


@pytest.mark.parametrize("vmid", ["100", "999999999"])
def test_the_ends_of_the_vmid_range(hook, vmid):
    assert hook(vmid, "post-stop")[0] == 0


@pytest.mark.parametrize("vmid", ["١٢٣", "²", "12"])
def test_the_cli_vmid_type(vmid):
    from click.testing import CliRunner

    from pvehook.cli import cli

    res = CliRunner().invoke(cli, ["check", vmid])
    assert res.exit_code == 2
    assert "is not a Proxmox VM id" in res.output


def test_another_vms_record_is_rewritten_only_under_its_lock(host, hook, ctx, monkeypatch):
    """VM 100 takes over a device from VM 200's stale record while VM 200's record lock
    is held (VM 200's own run rewriting it): the take-over waits for that lock, and
    gives up after its deadline without moving anything or touching the record."""
    import pvehook.holds
    from pvehook.records import record_lock
    from pvehook.pins import accept

    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    host.vm_config(200, f"hostpci0: {A}\n")
    assert hook(200, "pre-start")[0] == 0
    before = (host.root.state_dir / "200.json").read_bytes()
    monkeypatch.setattr(pvehook.holds, "RECORD_GRACE_S", 0.0)
    ctx.timeouts = ctx.timeouts._replace(lock=0.3)
    accept(ctx, 100)  # VM 200's pinned drive: VM 100 shares it only when told to
    with record_lock(host.root, 200):
        code, out = hook(100, "pre-start")
    assert code == 12 and "the record of VM 200 is locked" in out, out
    assert (host.root.state_dir / "200.json").read_bytes() == before
    assert host.driver_of(A) == "vfio-pci"  # still where VM 200 left it
    code, out = hook(100, "pre-start")  # the lock free: taken over
    assert code == 0 and "taken over" in out, out
    assert record(host, 200) is None


def test_a_config_file_with_an_odd_vmid_is_not_a_vm(host, ctx):
    from pvehook.cli.configs import vm_configs

    host.vm_config(100, "memory: 512\n")
    for odd in ("²", "١٢٣", "099"):
        host.root.pve("qemu-server", f"{odd}.conf").write_text("memory: 512\n")
    assert [vmid for _n, vmid, _c in vm_configs(host.root)] == [100]


# -- the fake kernel itself ---------------------------------------------------------------------

def test_the_fake_kernel_binds_only_what_the_driver_matches(host, ctx):
    """As pci_bus_match: with driver_override only that driver, else an id of the
    driver's table or one added with new_id."""
    import errno

    nvme(host)
    host.add_driver("vfio-pci")
    drivers = host.sys / "bus/pci/drivers"
    k = ctx.kernel
    k.write(drivers / "nvme/unbind", A)
    for drv in ("vfio-pci", "e1000e"):
        with pytest.raises(OSError) as e:
            k.write(drivers / drv / "bind", A)
        assert e.value.errno == errno.ENODEV and host.driver_of(A) is None
    k.write(drivers / "vfio-pci/new_id", "1b36 0010")
    k.write(drivers / "vfio-pci/bind", A)
    assert host.driver_of(A) == "vfio-pci"
    k.write(drivers / "vfio-pci/unbind", A)
    k.write(host.device_dir(A) / "driver_override", "e1000e")
    with pytest.raises(OSError):
        k.write(drivers / "nvme/bind", A)  # its own driver, but the override says e1000e
    k.write(host.sys / "bus/pci/drivers_probe", A)
    assert host.driver_of(A) == "e1000e"  # the override wins over every id table
