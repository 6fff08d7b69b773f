"""Guest reboots, starts that fail after pre-start, and the deferred release, on the
fake kernel. `ctx.later` is tests/fakesys.py's FakeLater: `fire` runs the releases
scheduled so far, as their timers would once the bound has passed."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fakesys
import pytest

from fakesys import record
from pvehook.records import device_locks

A = "0000:01:00.0"
B = "0000:02:00.0"
BIN = Path(__file__).parent / "bin"


def nvme(host, addr=A, group=1, **kw):
    return fakesys.nvme(host, addr, group, partitions=1, **kw)


def reboot_flag(host, vmid):
    """What vm_reboot (qm reboot) writes before it shuts the VM down."""
    return host.root.run("qemu-server", f"{vmid}.reboot")


@pytest.fixture
def qemu(host):
    """qemu(vmid): a live process named in /run/qemu-server/<vmid>.pid, as while it runs."""
    procs = []

    def start(vmid):
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        procs.append(p)
        host.root.proc(str(p.pid)).mkdir(parents=True, exist_ok=True)
        host.root.run("qemu-server", f"{vmid}.pid").write_text(f"{p.pid}\n")
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def stopped(host, vmid):
    host.root.run("qemu-server", f"{vmid}.pid").unlink(missing_ok=True)


# -- a reboot --------------------------------------------------------------------------

def test_reboot_keeps_the_device_on_vfio_then_the_last_stop_gives_it_back(host, hook, ctx,
                                                                          qemu):
    nvme(host)
    host.vm_config(100, f"memory: 2048\nmachine: q35\nhostpci0: {A},pcie=1\n")
    assert hook(100, "pre-start")[0] == 0
    qemu(100)
    assert ctx.later.fire(ctx) == [0]  # the start's check: the VM runs, nothing happens
    assert host.driver_of(A) == "vfio-pci"

    reboot_flag(host, 100).touch()
    stopped(host, 100)
    code, out = hook(100, "post-stop")
    assert code == 0, out
    assert host.driver_of(A) == "vfio-pci"
    assert f"{A} stays on vfio-pci for the reboot of VM 100" in out
    rec = record(host, 100)
    assert rec["kept_for_reboot"] <= time.time()
    assert rec["devices"][0]["original_driver"] == "nvme"

    reboot_flag(host, 100).unlink()  # qm cleanup clears it, then starts the VM
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert host.driver_of(A) == "vfio-pci"
    assert f"{A}: on vfio-pci since the reboot of VM 100; goes back to nvme" in out
    rec = record(host, 100)
    assert rec["devices"][0]["original_driver"] == "nvme" and "kept_for_reboot" not in rec
    qemu(100)

    stopped(host, 100)
    code, out = hook(100, "post-stop")
    assert code == 0, out
    assert host.driver_of(A) == "nvme"
    assert len(host.namespaces_of(A)) == 2
    assert record(host, 100) is None
    assert ctx.later.fire(ctx) == [0, 0]  # the reboot's and the restart's: no record
    assert host.driver_of(A) == "nvme"


def test_a_device_dropped_from_the_config_at_the_reboot_goes_back(host, hook, ctx):
    """qm reboot applies pending changes at the restart: a hostpci removed meanwhile."""
    nvme(host, A, group=1)
    nvme(host, B, group=2)
    host.vm_config(100, f"hostpci0: {A}\nhostpci1: {B}\n")
    assert hook(100, "pre-start")[0] == 0
    reboot_flag(host, 100).touch()
    assert hook(100, "post-stop")[0] == 0
    assert host.driver_of(A) == host.driver_of(B) == "vfio-pci"
    reboot_flag(host, 100).unlink()
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert f"{B}: VM 100 does not pass it any more: giving it back" in out
    assert host.driver_of(A) == "vfio-pci" and host.driver_of(B) == "nvme"
    assert [d["address"] for d in record(host, 100)["devices"]] == [A]


def test_reboot_without_a_restart_gives_back_after_the_bound(host, hook, ctx):
    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0
    ctx.later.jobs.clear()  # the start went fine (this test is about the reboot)
    reboot_flag(host, 100).touch()
    assert hook(100, "post-stop")[0] == 0
    assert host.driver_of(A) == "vfio-pci"
    # qm cleanup never started the VM again (qmeventd down, the start refused...).
    [(vmid, _gen, delay)] = ctx.later.jobs
    assert vmid == 100 and delay == 120 + 60  # hostpci: 4 x 30 s, + the margin
    assert ctx.later.fire(ctx) == [0]
    assert host.driver_of(A) == "nvme"
    assert (host.device_dir(A) / "driver_override").read_text().strip() == "(null)"
    assert record(host, 100) is None


def test_a_plain_stop_gives_back_at_once(host, hook, ctx):
    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0
    ctx.later.jobs.clear()
    code, out = hook(100, "post-stop")
    assert code == 0 and host.driver_of(A) == "nvme", out
    assert ctx.later.jobs == []


def test_a_device_on_vfio_before_the_start_is_not_kept_or_checked(host, hook, ctx):
    host.add_driver("vfio-pci")
    nvme(host, driver="vfio-pci")
    host.vm_config(100, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0
    assert ctx.later.jobs == []  # nothing to give back, so nothing scheduled
    reboot_flag(host, 100).touch()
    assert hook(100, "post-stop")[0] == 0
    assert ctx.later.jobs == [] and record(host, 100) is None
    assert host.driver_of(A) == "vfio-pci"


# -- a start that fails after pre-start ----------------------------------------------------

def test_failed_start_gives_every_device_back_after_the_deadline(host, hook, ctx):
    nvme(host, A, group=1)
    nvme(host, B, group=2)
    host.vm_config(100, f"memory: 65536\nnet0: virtio=AA:BB:CC:DD:EE:FF,bridge=vmbr0\n"
                        f"hostpci0: {A}\nhostpci1: {B}\n")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert host.driver_of(A) == host.driver_of(B) == "vfio-pci"
    # qemu-server's start timeout: 64 x 4 (hostpci) + 5 (one NIC) = 261 s, + the margin.
    [(vmid, gen, delay)] = ctx.later.jobs
    assert (vmid, delay) == (100, 261 + 60)
    assert gen == record(host, 100)["generation"]
    assert "its devices go back to the host if it is not running in 321 s" in out
    # QEMU never came up: no pid file, and no post-stop.
    assert ctx.later.fire(ctx) == [0]
    assert host.driver_of(A) == host.driver_of(B) == "nvme"
    assert len(host.namespaces_of(A)) == len(host.namespaces_of(B)) == 2
    assert record(host, 100) is None


def test_a_device_stuck_in_the_kernel_at_pre_start_goes_back_later(host, hook, ctx):
    """The rollback cannot give back a device whose unbind is still in the kernel; the
    start is aborted, so no post-stop will come: the deferred release does it."""
    nvme(host, A, group=1)
    nvme(host, B, group=2)
    host.fault(B, "unbind", "delay", 1)
    host.vm_config(100, f"hostpci0: {A}\nhostpci1: {B}\n")
    ctx.timeouts = ctx.timeouts._replace(rebind=0.2)
    code, out = hook(100, "pre-start")
    assert code == 13 and f"the kernel is still busy with {B}" in out, out
    assert "pvehook release 100" in out
    assert host.driver_of(A) == "nvme"
    assert ctx.later.fire(ctx) == [0]  # waits for B's lock, held by the stuck writer
    with device_locks(host.root, [B], 10):  # the writer is done with B
        assert host.driver_of(B) == "nvme"
    assert record(host, 100) is None


def test_a_running_vm_keeps_its_devices(host, hook, ctx, qemu):
    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0
    qemu(100)
    assert ctx.later.fire(ctx) == [0]
    assert host.driver_of(A) == "vfio-pci"
    assert record(host, 100) is not None


def test_a_newer_start_in_between_keeps_the_devices(host, hook, ctx):
    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0  # start 1: its check is pending
    reboot_flag(host, 100).touch()
    assert hook(100, "post-stop")[0] == 0  # kept for the reboot: a second check
    reboot_flag(host, 100).unlink()
    old = list(ctx.later.jobs)
    ctx.later.jobs.clear()
    assert hook(100, "pre-start")[0] == 0  # start 2, its QEMU not (yet) running
    new = list(ctx.later.jobs)
    ctx.later.jobs = old
    assert ctx.later.fire(ctx) == [0, 0]  # both checks of start 1 find start 2's record
    assert host.driver_of(A) == "vfio-pci"
    assert record(host, 100)["devices"][0]["original_driver"] == "nvme"
    ctx.later.jobs = new
    assert ctx.later.fire(ctx) == [0]  # start 2's own check: it failed too
    assert host.driver_of(A) == "nvme"


def test_the_release_waits_for_qemu_servers_lock_of_the_vm(host, hook, ctx):
    """A start in progress holds lock-<vmid>.conf: the release does not act under it."""
    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0
    lock = host.root.run("lock", "qemu-server", "lock-100.conf")
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a');"
         " fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
         str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        ctx.timeouts = ctx.timeouts._replace(lock=0.3)
        assert ctx.later.fire(ctx) == [0]
        assert host.driver_of(A) == "vfio-pci"
    finally:
        holder.stdin.close()
        holder.wait()
    # It did not give up on the device: the same release, once more after the bound.
    assert [(v, g) for v, g, _ in ctx.later.jobs] == [(100, record(host, 100)["generation"])]
    assert ctx.later.fire(ctx) == [0]
    assert host.driver_of(A) == "nvme"


def test_a_reboot_whose_release_cannot_be_scheduled_gives_back_now(host, hook, ctx):
    class Broken:
        def release_after(self, *a):
            raise OSError("no systemd-run and no fork")

    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0
    ctx._later = Broken()
    reboot_flag(host, 100).touch()
    code, out = hook(100, "post-stop")
    assert code == 0, out
    assert "could not schedule the give-back" in out and "giving its devices back now" in out
    assert host.driver_of(A) == "nvme"


@pytest.mark.parametrize("options, expect", [
    ({}, 30),
    ({"hostpci0": "01:00.0"}, 120),
    ({"memory": "65536", "hostpci0": "x"}, 256),
    ({"memory": "current=65536"}, 64),
    ({"memory": "30720"}, 30),
    ({"hostpci0": "x", "hugepages": "1024"}, 150),
    ({"hostpci0": "x", "vmstate": "local:state"}, 300),
    ({"net0": "x", "net1": "y"}, 40),
])
def test_start_timeout_is_qemu_servers(options, expect):
    from pvehook.restarts import start_timeout

    assert start_timeout(options) == expect


# -- the real scheduler: systemd-run ------------------------------------------------------

def test_systemd_timer_runs_the_release_after_a_failed_start(host, hook, ctx, tmp_path,
                                                              monkeypatch):
    """With systemd as PID 1 the release is a transient timer; the stand-in systemd-run
    records the argv and runs the job (the CLI, over the fake kernel) after the delay."""
    log = tmp_path / "systemd-run.log"
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SYSTEMD_RUN_LOG", str(log))
    host.root.run("systemd", "system").mkdir(parents=True)
    ctx._later = None  # the real one
    ctx.timeouts = ctx.timeouts._replace(give_back=0.2)
    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")

    code, out = hook(100, "pre-start")
    assert code == 0, out
    gen = record(host, 100)["generation"]
    [argv] = [json.loads(line) for line in log.read_text().splitlines()]
    unit = next(a.split("=", 1)[1] for a in argv if a.startswith("--unit="))
    assert unit.startswith(f"pvehook-release-100-{gen}-")
    assert f"systemd timer {unit}.timer" in out
    cmd = argv[argv.index("--") + 1:]
    assert cmd == [sys.executable, "-P", "-m", "pvehook.cli", "release", "100",
                   "--deferred", gen]
    opts = argv[:argv.index("--")]
    assert {f"--unit={unit}", "--on-active=1s", "--timer-property=AccuracySec=1s",
            "--collect", f"--setenv=PVEHOOK_ROOT={host.base}",
            "--setenv=PVEHOOK_TIMEOUT_LOCK=5.0"} <= set(opts)

    rc = Path(f"{log}.{unit}.rc")
    deadline = time.monotonic() + 60
    while not rc.exists() and time.monotonic() < deadline:  # the job: sleep, then click
        time.sleep(0.05)
    assert rc.read_text() == "0\n"
    assert host.driver_of(A) == "nvme"
    assert record(host, 100) is None


def test_without_systemd_run_the_fallback_is_a_detached_process(host, ctx, monkeypatch):
    """It execs the same job (run for real by tests/vm/test_restarts_vm.py); here: it is
    out of the hook's session and process group, and keeps none of its descriptors."""
    from pvehook.later import Later

    host.root.run("systemd", "system").mkdir(parents=True)
    monkeypatch.setenv("PATH", "/nonexistent")
    how = Later(host.root).release_after(ctx, 100, "0", 30)
    pid = int(how.split()[1])
    try:
        assert "systemd-run not found" in how
        assert os.getsid(pid) != os.getsid(0) and os.getpgid(pid) != os.getpgid(0)
        fds = os.listdir(f"/proc/{pid}/fd")
        deadline = time.monotonic() + 10
        while len(fds) > 3 and time.monotonic() < deadline:  # it closes the rest first
            fds = os.listdir(f"/proc/{pid}/fd")
            time.sleep(0.01)
        assert sorted(fds) == ["0", "1", "2"]
        assert all(os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null" for fd in fds)
    finally:
        os.kill(pid, 9)


def test_a_reboot_under_systemd_has_its_own_timer(host, hook, ctx, tmp_path, monkeypatch):
    """The start's release is still pending when the reboot's post-stop schedules one for
    the same generation: two timers, both run, the device goes back once."""
    log = tmp_path / "systemd-run.log"
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SYSTEMD_RUN_LOG", str(log))
    host.root.run("systemd", "system").mkdir(parents=True)
    ctx._later = None
    ctx.timeouts = ctx.timeouts._replace(give_back=0.2, lock=60)
    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    lock = host.root.run("lock", "qemu-server", "lock-100.conf")
    lock.parent.mkdir(parents=True)
    with open(lock, "a") as held:  # both releases wait until the test has done both runs
        fcntl.flock(held, fcntl.LOCK_EX)
        assert hook(100, "pre-start")[0] == 0
        reboot_flag(host, 100).touch()
        code, out = hook(100, "post-stop")
        assert code == 0 and "kept for the reboot; systemd timer" in out, out
        assert host.driver_of(A) == "vfio-pci"
    units = [next(a.split("=", 1)[1] for a in json.loads(line) if a.startswith("--unit="))
             for line in log.read_text().splitlines()]
    assert len(units) == len(set(units)) == 2
    deadline = time.monotonic() + 60
    rcs = [Path(f"{log}.{u}.rc") for u in units]
    while not all(rc.exists() for rc in rcs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [rc.read_text() for rc in rcs] == ["0\n", "0\n"]
    assert host.driver_of(A) == "nvme"


def test_a_device_kept_for_a_reboot_is_not_taken_by_another_vm(host, hook, ctx, qemu,
                                                                 monkeypatch):
    """The device stays VM 100's between its post-stop and its restart, past the grace
    period of a record (which covers only a pre-start's way to a running QEMU)."""
    import pvehook.holds

    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    host.vm_config(200, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0
    qemu(100)
    reboot_flag(host, 100).touch()
    stopped(host, 100)
    assert hook(100, "post-stop")[0] == 0
    monkeypatch.setattr(pvehook.holds, "RECORD_GRACE_S", 0.0)
    code, out = hook(200, "pre-start")
    assert code == 12 and "VM 100" in out, out
    assert host.driver_of(A) == "vfio-pci" and record(host, 100)["kept_for_reboot"]


def test_a_planted_qemu_server_lock_directory_is_not_used(host, hook, ctx):
    """/run/lock is world-writable: a /run/lock/qemu-server a local user made first (or a
    lock file that is a link) is neither followed nor written; the device stays where it
    is and the message says what to do."""
    from pvehook.errors import StateDirError
    from pvehook.release import release

    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0
    lockdir = host.root.run("lock", "qemu-server")
    lockdir.mkdir()
    os.chown(lockdir, 1000, 1000)
    with pytest.raises(StateDirError, match="not a directory of root's"):
        release(ctx, 100)
    assert host.driver_of(A) == "vfio-pci"
    os.chown(lockdir, 0, 0)
    target = host.base / "etc-shadow"
    os.symlink(target, lockdir / "lock-100.conf")
    with pytest.raises(StateDirError, match="a link"):
        release(ctx, 100)
    assert not target.exists() and host.driver_of(A) == "vfio-pci"
    os.unlink(lockdir / "lock-100.conf")
    release(ctx, 100)
    assert host.driver_of(A) == "nvme"
