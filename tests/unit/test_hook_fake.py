"""The hook's lifecycle on the fake kernel: what the tree shows afterwards."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from fakesys import BRIDGE_CLASS, FakeNamespace, NIC_CLASS, nvme, record, start_together

A = "0000:01:00.0"
B = "0000:02:00.0"
NIC = "0000:03:00.0"


# -- the lifecycle ---------------------------------------------------------------------

def test_assign_and_give_back(host, hook):
    nvme(host)
    host.vm_config(100, "memory: 2048\nmachine: q35\nhostpci0: 0000:01:00.0,pcie=1\n")
    before = host.namespaces_of(A)

    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert host.driver_of(A) == "vfio-pci"
    assert (host.device_dir(A) / "driver_override").read_text().strip() == "vfio-pci"
    assert host.namespaces_of(A) == []
    assert f"{A} nvme -> vfio-pci" in out
    assert record(host, 100)["devices"][0]["original_driver"] == "nvme"

    code, out = hook(100, "post-stop")
    assert code == 0, out
    assert host.driver_of(A) == "nvme"
    assert (host.device_dir(A) / "driver_override").read_text().strip() == "(null)"
    after = host.namespaces_of(A)
    assert len(after) == len(before) == 3  # the namespace and its two partitions
    assert after != before  # the kernel gave them new names
    assert f"{A} vfio-pci -> nvme" in out
    assert record(host, 100) is None


def test_short_ids_and_all_functions(host, hook):
    nvme(host, "0000:01:00.0", group=1)
    nvme(host, "0000:01:00.1", group=1)
    host.vm_config(100, "hostpci0: 01:00\n")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert host.driver_of("0000:01:00.0") == host.driver_of("0000:01:00.1") == "vfio-pci"


def test_post_stop_twice_and_without_record(host, hook):
    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0
    assert hook(100, "post-stop")[0] == 0
    code, out = hook(100, "post-stop")
    assert code == 0 and "nothing to give back" in out
    assert host.driver_of(A) == "nvme"
    assert hook(555, "post-stop")[0] == 0


def test_already_on_vfio_stays(host, hook):
    host.add_driver("vfio-pci")
    nvme(host, driver="vfio-pci")
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 0 and "already on vfio-pci" in out
    assert hook(100, "post-stop")[0] == 0
    assert host.driver_of(A) == "vfio-pci"


def test_leaves_non_nvme_and_driver_keep_alone(host, hook):
    host.add_pci(NIC, cls=NIC_CLASS, vendor=0x8086, device=0x10D3, group=3)
    nvme(host)
    host.vm_config(100, f"hostpci0: {NIC}\nhostpci1: {A},driver=keep\n")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert "not an NVMe controller, left to Proxmox" in out
    assert "driver=keep" in out
    assert host.driver_of(NIC) == "e1000e" and host.driver_of(A) == "nvme"
    assert record(host, 100) is None


def test_pending_and_snapshot_sections_do_not_count(host, hook):
    nvme(host)
    host.vm_config(100, f"memory: 512\n\n[PENDING]\nhostpci0: {A}\n\n[snap1]\nhostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 0 and "no hostpci devices" in out
    assert host.driver_of(A) == "nvme"


def test_mapping_for_this_node(host, hook):
    nvme(host, A, group=1)
    nvme(host, B, group=2)
    host.root.pve("mapping").mkdir(parents=True)
    host.root.pve("mapping", "pci.cfg").write_text(
        "disk\n\tmap node=other,path=0000:01:00.0,id=1b36:0010\n"
        "\tmap node=pve1,path=0000:02:00.0,id=1b36:0010,iommugroup=2\n")
    host.vm_config(100, "hostpci0: mapping=disk\n")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert host.driver_of(B) == "vfio-pci" and host.driver_of(A) == "nvme"


# -- phases and arguments --------------------------------------------------------------

@pytest.mark.parametrize("phase", ["post-start", "pre-stop"])
def test_quiet_phases(host, hook, phase):
    assert hook(100, phase) == (0, "")


def test_unknown_phase_warns(hook):
    code, out = hook(100, "pre-migrate")
    assert code == 0 and "warning: unknown phase" in out


@pytest.mark.parametrize("argv", [[], ["100"], ["abc", "pre-start"], ["1", "pre-start", "x"]])
def test_usage_errors(ctx, argv, capsys):
    from pvehook.hook import run

    assert run(argv, ctx) == 2
    assert "usage:" in capsys.readouterr().err


def test_missing_config(hook):
    code, out = hook(404, "pre-start")
    assert code == 1 and "404.conf" in out


def test_script_entry_point(host, tmp_path):
    """The executable Proxmox runs: shebang, exit code, output."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo, PVEHOOK_ROOT=str(host.base))
    p = subprocess.run([sys.executable, f"{repo}/hooks/pvehook-hook", "100", "nonsense"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0 and "unknown phase" in p.stdout
    p = subprocess.run([sys.executable, f"{repo}/hooks/pvehook-hook", "x"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2


def _imports(argv: list[str], env: dict) -> set[str]:
    """Every module a fresh interpreter imports for argv (-X importtime)."""
    p = subprocess.run([sys.executable, "-X", "importtime", *argv],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    return {line.split("|")[-1].strip() for line in p.stderr.splitlines()
            if line.startswith("import time:")}


# The CLI's API stack, and modules that cost more to import than a whole hook run needs
# (filelock 3.18 imports asyncio; dataclasses imports inspect): see README, Performance.
NOT_IN_THE_HOOK = {"proxmoxer", "requests", "click", "filelock", "asyncio", "logging",
                   "dataclasses", "inspect", "typing", "pyudev", "tempfile", "shutil"}


def test_the_hook_imports_only_what_it_needs(host):
    """The hook runs at every VM start and stop (README, Performance)."""
    host.add_driver("vfio-pci")
    nvme(host, driver="vfio-pci")  # stays on vfio-pci: every check runs, the record is written
    host.vm_config(100, f"hostpci0: {A}\nscsi0: local-lvm:vm-100-disk-0,size=1G\n")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo, PVEHOOK_ROOT=str(host.base))
    hook = f"{repo}/hooks/pvehook-hook"

    bare = _imports(["-c", "pass"], env)  # site and whatever .pth files import
    pre_start = _imports([hook, "100", "pre-start"], env) - bare
    assert "pvehook.plan" in pre_start  # the whole pre-start path ran
    assert {m.split(".")[0] for m in pre_start} & NOT_IN_THE_HOOK == set()
    assert not [m for m in pre_start if m.startswith("pvehook.cli")]  # the CLI's house
    # No storage.cfg on this node: no disk to confirm on LVM, so no lvs and no subprocess.
    assert "subprocess" not in pre_start
    assert [d["address"] for d in record(host, 100)["devices"]] == [A]

    post_start = _imports([hook, "100", "post-start"], env) - bare
    assert post_start <= {"pvehook", "pvehook.hook", "pvehook.errors", "pvehook.exitcodes",
                          "__future__"}


# -- refusals: nothing changes -----------------------------------------------------------

def test_iommu_off(tmp_path, hook, ctx):
    from fakesys import FakeHost, FakeKernel
    from pvehook.context import Context

    h = FakeHost(tmp_path / "noiommu", iommu=False)
    nvme(h)
    h.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start", Context(h.root, FakeKernel(h), "pve1", ctx.timeouts))
    assert code == 10 and "IOMMU is off" in out
    assert h.driver_of(A) == "nvme"


def test_shared_group_refused_names_the_member(host, hook):
    host.add_pci("0000:00:1e.0", cls=BRIDGE_CLASS, group=7)
    host.secondary_bus("0000:00:1e.0")
    nvme(host, group=7, parent="0000:00:1e.0")
    host.add_pci(NIC, cls=NIC_CLASS, group=7, parent="0000:00:1e.0")
    host.add_netif(NIC, "enp3s0", up=True, ipv4=("192.0.2.10",))
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 11, out
    assert f"{NIC} (e1000e, class 020000) is in IOMMU group 7 with hostpci0 ({A})" in out
    assert "network interface enp3s0 (up) has the address 192.0.2.10" in out
    assert "VM 100 not started" in out
    assert host.driver_of(A) == "nvme" and host.driver_of(NIC) == "e1000e"
    assert len(host.namespaces_of(A)) == 3
    assert record(host, 100) is None


@pytest.mark.parametrize("nic_driver", [None, "vfio-pci", "passed"])
def test_shared_group_allowed_when_the_host_does_not_use_it(host, hook, nic_driver):
    host.add_driver("vfio-pci")
    nvme(host, group=7)
    host.add_pci(NIC, cls=NIC_CLASS, group=7,
                 driver="e1000e" if nic_driver == "passed" else nic_driver)
    extra = f"hostpci1: {NIC}\n" if nic_driver == "passed" else ""
    host.vm_config(100, f"hostpci0: {A}\n{extra}")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert host.driver_of(A) == "vfio-pci"


@pytest.mark.parametrize("use, expect", [
    (lambda h, n: h.mount(f"{n}p1", "/mnt/data"), "mounted at /mnt/data"),
    (lambda h, n: h.mount(n, "/srv", "xfs"), "mounted at /srv"),
    (lambda h, n: h.mount(f"{n}p2", "/"), "holds /: it is the host's own system disk"),
    (lambda h, n: h.mount(f"{n}p1", "/boot"), "holds /boot"),
    (lambda h, n: h.swapon(f"{n}p2"), "is active swap"),
    (lambda h, n: h.hold(f"{n}p1", dm_name="vg0-data"), "held by dm-0 (vg0-data), an active LVM"),
    (lambda h, n: h.set_busy(n), "opened exclusively"),
])
def test_host_use_refused(host, hook, use, expect):
    nvme(host)
    name = host.namespaces_of(A)[0]
    use(host, name)
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 11, out
    assert expect in out
    assert host.driver_of(A) == "nvme"


def test_lvm_mounted_through_device_mapper(host, hook):
    nvme(host)
    name = host.namespaces_of(A)[0]
    host.hold(f"{name}p1", dm_name="pve-root")
    dm = host.block("dm-0")
    with open(host.root.proc("self/mountinfo"), "a") as f:
        f.write(f"50 22 {(dm / 'dev').read_text().strip()} / / rw - ext4 /dev/mapper/pve-root rw\n")
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 11 and "holds / through dm-0 (pve-root)" in out


def test_zfs_pool_named(host, hook):
    nvme(host, namespaces=[FakeNamespace(fs_type="zfs_member")])
    name = host.namespaces_of(A)[0]
    udev = host.root.run("udev/data", "b" + host.devnum(name))
    udev.write_text(udev.read_text() + "E:ID_FS_LABEL=tank\n")
    host.set_busy(name)
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 11 and "imported ZFS pool 'tank'" in out


def test_guest_lvm_signature_passes_with_a_note(host, hook):
    nvme(host, namespaces=[FakeNamespace(partitions=2, part_fs_types=[None, "LVM2_member"])])
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert "carries an LVM physical volume, not active on the host" in out
    assert host.driver_of(A) == "vfio-pci"


def test_refuses_every_device_before_changing_any(host, hook):
    nvme(host, A, group=1)
    nvme(host, B, group=2)
    host.mount(host.namespaces_of(B)[0], "/mnt")
    host.vm_config(100, f"hostpci0: {A}\nhostpci1: {B}\n")
    code, out = hook(100, "pre-start")
    assert code == 11
    assert host.driver_of(A) == host.driver_of(B) == "nvme"


# -- another VM holds it -----------------------------------------------------------------

def fake_process(host, pid):
    host.root.proc(str(pid)).mkdir(parents=True, exist_ok=True)


def test_qemu_server_reservation_of_running_vm(host, hook):
    nvme(host)
    fake_process(host, 4242)
    host.root.run("qemu-server", "pci-id-reservations").write_text(f"{A} 200 pid:4242\n")
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 12 and "held by VM 200" in out
    assert host.driver_of(A) == "nvme"


def test_stale_reservation_is_ignored(host, hook):
    nvme(host)
    host.root.run("qemu-server", "pci-id-reservations").write_text(
        f"{A} 200 pid:4243\n{B} 201 time:1\n")
    host.vm_config(100, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0


def test_record_of_other_running_vm(host, hook):
    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    host.vm_config(200, f"hostpci0: {A}\n")
    assert hook(200, "pre-start")[0] == 0
    code, out = hook(100, "pre-start")
    assert code == 12 and "VM 200" in out


def test_stale_record_of_stopped_vm_is_taken_over(host, ctx, hook, monkeypatch):
    import pvehook.holds
    from pvehook.pins import accept

    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    host.vm_config(200, f"hostpci0: {A}\n")
    assert hook(200, "pre-start")[0] == 0
    monkeypatch.setattr(pvehook.holds, "RECORD_GRACE_S", 0.0)  # VM 200 never started QEMU
    accept(ctx, 100)  # VM 200's pinned drive: VM 100 shares it only when told to
    code, out = hook(100, "pre-start")
    assert code == 0 and "taken over" in out, out
    assert record(host, 200) is None
    assert hook(100, "post-stop")[0] == 0
    assert host.driver_of(A) == "nvme"


# -- failures: all or nothing --------------------------------------------------------------

def test_second_device_fails_both_end_on_nvme(host, hook):
    nvme(host, A, group=1)
    nvme(host, B, group=2)
    host.fault(B, "probe", "ignore", driver="vfio-pci")  # vfio-pci does not take it
    host.vm_config(100, f"hostpci0: {A}\nhostpci1: {B}\n")
    code, out = hook(100, "pre-start")
    assert code == 13, out
    assert f"vfio-pci did not take {B}" in out
    assert host.driver_of(A) == host.driver_of(B) == "nvme"
    assert len(host.namespaces_of(A)) == len(host.namespaces_of(B)) == 3
    assert record(host, 100) is None


def test_unbind_error(host, hook):
    nvme(host)
    host.fault(A, "unbind", "errno", errno.EBUSY)
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 13 and "driver nvme did not release" in out
    assert host.driver_of(A) == "nvme"


def test_hanging_unbind_has_a_deadline(host, hook, ctx):
    nvme(host, A, group=1)
    nvme(host, B, group=2)
    host.fault(B, "unbind", "delay", 2)
    host.vm_config(100, f"hostpci0: {A}\nhostpci1: {B}\n")
    ctx.timeouts = ctx.timeouts._replace(rebind=0.3)
    code, out = hook(100, "pre-start")
    assert code == 13
    assert f"driver nvme did not release {B}: no answer from the kernel within 0.3 s" in out
    assert f"the kernel is still busy with {B}" in out
    assert host.driver_of(A) == "nvme"  # rolled back
    # B stays recorded; post-stop waits for the write still in the kernel (it holds B's
    # lock), then gives B back.
    assert [d["address"] for d in record(host, 100)["devices"]] == [B]
    code, out = hook(100, "post-stop")
    assert code == 0, out
    assert host.driver_of(B) == "nvme"
    assert record(host, 100) is None


def test_killed_halfway_then_post_stop(host, hook, ctx):
    """A record written before the change, one device moved, the hook killed."""
    from pvehook import rebind
    from pvehook.records import DeviceRecord, VmRecord
    from pvehook.pci import PciAddress, PciDevice

    nvme(host, A, group=1)
    nvme(host, B, group=2)
    host.add_driver("vfio-pci")
    ctx.records.save(VmRecord(100, [DeviceRecord(A, "nvme", 1), DeviceRecord(B, "nvme", 1)]))
    assert rebind.move(ctx.kernel, [(PciDevice(ctx.root, PciAddress.parse(A)), "vfio-pci")]) == {}
    assert host.driver_of(A) == "vfio-pci"
    code, out = hook(100, "post-stop")
    assert code == 0, out
    assert host.driver_of(A) == host.driver_of(B) == "nvme"
    assert record(host, 100) is None


def _waits_on(pid: int) -> bool:
    """Does this process hold a pidfd of `pid` (the hook waiting for it to exit)?"""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[pidfd]":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                if f"Pid:\t{pid}\n" in f.read():
                    return True
        except OSError:
            continue
    return False


def test_post_stop_waits_for_qemu_to_close_vfio(host, hook, ctx):
    """QEMU still exiting holds /dev/vfio/<group>: post-stop waits for it to exit instead
    of unbinding under it (vfio-pci's unbind would block until QEMU lets go; the fake
    kernel blocks as the real one does, and says so in its dmesg)."""
    import threading

    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0
    ctx.timeouts = ctx.timeouts._replace(vfio_release=120, rebind=120)
    qemu = host.open_vfio(1)
    done = {}
    stop = threading.Thread(target=lambda: done.update(result=hook(100, "post-stop")))
    stop.start()
    try:
        # Until the hook waits on QEMU, or (the wait gone) its unbind blocks in the kernel.
        while not (_waits_on(qemu.pid) or "blocked" in host.dmesg()):
            assert stop.is_alive(), done
            stop.join(0.01)
    finally:
        qemu.terminate()
        qemu.wait()
        stop.join()
    code, out = done["result"]
    assert code == 0, out
    assert "blocked until device is released" not in host.dmesg()
    assert host.driver_of(A) == "nvme"


def test_post_stop_gives_up_on_a_vfio_user_that_stays(host, hook, ctx):
    nvme(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0
    qemu = host.open_vfio(1)
    try:
        ctx.timeouts = ctx.timeouts._replace(vfio_release=0.3)
        code, out = hook(100, "post-stop")
    finally:
        qemu.terminate()
        qemu.wait()
    assert code == 14 and f"still open through VFIO by pid {qemu.pid}" in out
    assert host.driver_of(A) == "vfio-pci"
    assert host.dmesg() == ""  # no unbind was tried under QEMU
    assert record(host, 100) is not None  # a later post-stop can still give it back
    assert hook(100, "post-stop")[0] == 0
    assert host.driver_of(A) == "nvme"


def test_post_stop_reports_each_device(host, hook):
    nvme(host, A, group=1)
    nvme(host, B, group=2)
    host.vm_config(100, f"hostpci0: {A}\nhostpci1: {B}\n")
    assert hook(100, "pre-start")[0] == 0
    host.fault(A, "probe", "ignore")
    code, out = hook(100, "post-stop")
    assert code == 14 and f"nvme did not take {A}" in out
    assert host.driver_of(B) == "nvme"
    assert [d["address"] for d in record(host, 100)["devices"]] == [A]


# -- concurrency ---------------------------------------------------------------------------

def test_two_vms_one_device_exactly_one_wins(host, ctx):
    """Two pre-starts at once, in two processes, name the same controller."""
    nvme(host)
    host.fault(A, "unbind", "delay", 0.3)  # widen the window
    host.vm_config(100, f"hostpci0: {A}\n")
    host.vm_config(200, f"hostpci0: {A}\n")
    codes = sorted(start_together(ctx, (100, 200)))
    assert codes == [0, 12]
    assert host.driver_of(A) == "vfio-pci"
