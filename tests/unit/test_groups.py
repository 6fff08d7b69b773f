"""Everything a start takes from the host, on the fake kernel (issue 12, items 1, 4-6, 8).

qemu-server binds every member of the IOMMU group of every hostpci entry (but
driver=keep and mdev) to vfio-pci; the hook refuses when one of them holds a disk or a
network interface the host uses, whatever the member's class. The assertions are about
what the tree shows afterwards: drivers, records, and the hook's lines.
"""

from __future__ import annotations

import os

import fakesys
import pytest

from fakesys import NIC_CLASS, record, start_together

A = "0000:01:00.0"  # NVMe
B = "0000:02:00.0"  # NVMe
NIC = "0000:03:00.0"
GPU = "0000:0a:00.0"
AUDIO = "0000:0a:00.1"
SATA = "0000:05:00.0"
ISA = "0000:00:1f.0"
GPU_CLASS, AUDIO_CLASS, AHCI_CLASS, ISA_CLASS = 0x030000, 0x040300, 0x010601, 0x060100


def nvme(host, addr=A, group=1, **kw):
    return fakesys.nvme(host, addr, group, partitions=1, **kw)


def gpu(host, group=6):
    host.add_pci(GPU, cls=GPU_CLASS, vendor=0x1002, device=0x73BF, group=group, driver="amdgpu")
    host.add_pci(AUDIO, cls=AUDIO_CLASS, vendor=0x1002, device=0xAB28, group=group,
                 driver="snd_hda_intel")


# -- item 1: a host disk or uplink taken through the group of another entry ---------------

def test_nic_passed_whose_group_holds_the_mounted_nvme(host, hook):
    nvme(host, group=5)
    host.add_pci(NIC, cls=NIC_CLASS, group=5)
    disk = host.namespaces_of(A)[0]
    host.mount(disk, "/srv")
    host.vm_config(100, f"hostpci0: {NIC}\n")
    code, out = hook(100, "pre-start")
    assert code == 11, out
    assert (f"{A} (nvme, class 010802) is in IOMMU group 5 with hostpci0 ({NIC}), and"
            " qemu-server binds every device of the group to vfio-pci") in out
    assert f"{disk} is mounted at /srv" in out
    assert host.driver_of(A) == "nvme" and host.driver_of(NIC) == "e1000e"
    assert record(host, 100) is None


def test_gpu_passed_whose_group_holds_a_sata_disk_in_use(host, hook):
    gpu(host)
    host.add_pci(SATA, cls=AHCI_CLASS, vendor=0x8086, device=0xA352, group=6, driver="ahci")
    host.add_scsi_disk(SATA, "sda", partitions=2)
    host.mount("sda2", "/var/lib/vz")
    host.vm_config(100, f"hostpci0: {GPU.removeprefix('0000:')[:-2]},x-vga=1\n")
    code, out = hook(100, "pre-start")
    assert code == 11, out
    assert f"{SATA} (ahci, class 010601) is in IOMMU group 6" in out
    assert "sda2 is mounted at /var/lib/vz" in out
    assert host.driver_of(SATA) == "ahci"


def test_sata_disk_that_is_not_used_only_gets_a_line(host, hook):
    gpu(host)
    host.add_pci(SATA, cls=AHCI_CLASS, vendor=0x8086, device=0xA352, group=6, driver="ahci")
    host.add_scsi_disk(SATA, "sdb")
    host.vm_config(100, f"hostpci0: {GPU}\n")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert f"{SATA} (ahci, class 010601) shares IOMMU group 6 with hostpci0 ({GPU})" in out


def test_driver_keep_does_not_protect_a_member_of_a_bound_group(host, hook):
    """keep: qemu-server does not bind that entry, but the group bind of another takes it."""
    nvme(host, group=5)
    host.add_pci(NIC, cls=NIC_CLASS, group=5)
    host.mount(host.namespaces_of(A)[0], "/srv")
    host.vm_config(100, f"hostpci0: {NIC}\nhostpci1: {A},driver=keep\n")
    code, out = hook(100, "pre-start")
    assert code == 11, out
    assert f"{A} (nvme, class 010802) is in IOMMU group 5 with hostpci0 ({NIC})" in out
    assert host.driver_of(A) == "nvme"


def test_gpu_with_its_hdmi_audio_keeps_working(host, hook):
    """The usual GPU passthrough: the audio function goes along, with a line."""
    gpu(host)
    host.vm_config(100, f"hostpci0: {GPU},pcie=1,x-vga=1\nmachine: q35\n")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert (f"{AUDIO} (snd_hda_intel, class 040300) shares IOMMU group 6 with hostpci0"
            f" ({GPU}): qemu-server binds it to vfio-pci too") in out
    host.vm_config(101, f"hostpci0: {GPU.removeprefix('0000:')[:-2]}\n")  # both functions
    code, out = hook(101, "pre-start")
    assert code == 0 and "shares IOMMU group" not in out, out


def test_an_isa_bridge_is_bound_with_the_group_a_pci_bridge_is_not(host, hook):
    host.add_pci(ISA, cls=ISA_CLASS, vendor=0x8086, device=0x7A06, group=4, driver="lpc_ich")
    host.add_pci("0000:00:1c.0", cls=0x060400, group=4)  # root port with a bus behind it
    host.secondary_bus("0000:00:1c.0")
    host.add_pci(NIC, cls=NIC_CLASS, group=4)
    host.vm_config(100, f"hostpci0: {NIC}\n")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert f"{ISA} (lpc_ich, class 060100) shares IOMMU group 4" in out
    assert "0000:00:1c.0" not in out


@pytest.mark.parametrize("nif, why", [
    (dict(up=True, ipv4=("192.0.2.7",)), "has the address 192.0.2.7"),
    (dict(up=True, ipv6=(("20010db8000000000000000000000007", 0x00),)),
     "has the address 2001:db8:0:0:0:0:0:7/64"),
    (dict(up=True, master="vmbr0"), "is a port of vmbr0"),
    (dict(up=False, master="bond0"), "is a port of bond0"),
    (dict(up=True, uppers=("enp3s0.10",)), "carries enp3s0.10"),
])
def test_nvme_whose_group_holds_a_configured_nic_refused(host, hook, nif, why):
    nvme(host, group=7)
    host.add_pci(NIC, cls=NIC_CLASS, group=7)
    host.add_netif(NIC, "enp3s0", **nif)
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 11, out
    assert f"network interface enp3s0 ({'up' if nif['up'] else 'down'}) {why}" in out
    assert host.driver_of(A) == "nvme" and host.driver_of(NIC) == "e1000e"


@pytest.mark.parametrize("nif", [
    dict(up=False),
    dict(up=True, ipv6=(("fe800000000000000000000000000007", 0x20),)),  # link-local only
])
def test_nvme_whose_group_holds_an_unconfigured_nic_passes(host, hook, nif):
    nvme(host, group=7)
    host.add_pci(NIC, cls=NIC_CLASS, group=7)
    host.add_netif(NIC, "enp3s0", **nif)
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert f"{NIC} (e1000e, class 020000) shares IOMMU group 7 with hostpci0 ({A})" in out
    assert "network interface enp3s0" in out
    assert f"IOMMU group 7 shared with {NIC}" in out
    assert host.driver_of(A) == "vfio-pci"


def test_a_passed_nic_that_is_the_uplink_refused(host, hook):
    host.add_pci(NIC, cls=NIC_CLASS, group=3)
    host.add_netif(NIC, "eno1", up=True, master="vmbr0")
    host.vm_config(100, f"hostpci0: {NIC}\n")
    code, out = hook(100, "pre-start")
    assert code == 11, out
    assert f"hostpci0 passes {NIC} (e1000e, class 020000): the host uses it" in out


def test_a_group_member_held_by_another_vm(host, hook, ctx):
    from pvehook.records import DeviceRecord, VmRecord

    host.add_driver("vfio-pci")
    nvme(host, group=5, driver="vfio-pci")
    host.add_pci(NIC, cls=NIC_CLASS, group=5)
    ctx.records.save(VmRecord(200, [DeviceRecord(A, "nvme", 1)]))
    host.vm_config(100, f"hostpci0: {NIC}\n")
    code, out = hook(100, "pre-start")
    assert code == 12, out
    assert "held by VM 200" in out


def test_iommu_off_refuses_every_entry(tmp_path, hook, ctx):
    from fakesys import FakeHost, FakeKernel
    from pvehook.context import Context

    h = FakeHost(tmp_path / "noiommu", iommu=False)
    h.add_pci(NIC, cls=NIC_CLASS)
    h.vm_config(100, f"hostpci0: {NIC},driver=keep\n")
    code, out = hook(100, "pre-start", Context(h.root, FakeKernel(h), "pve1", ctx.timeouts))
    assert code == 10 and "IOMMU not present" in out


# -- item 4: a controller on another host driver -------------------------------------------

@pytest.mark.parametrize("driver", ["uio_pci_generic", "igb_uio"])
def test_nvme_on_another_host_driver_refused(host, hook, driver):
    nvme(host, driver=driver)
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 11, out
    assert f"{A} is bound to {driver}, not to nvme" in out
    assert host.driver_of(A) == driver


def test_nvme_on_pci_stub_is_taken_and_given_back(host, hook):
    nvme(host, driver="pci-stub")
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert host.driver_of(A) == "vfio-pci"
    assert hook(100, "post-stop")[0] == 0
    assert host.driver_of(A) == "pci-stub"


# -- item 5: native multipath ----------------------------------------------------------------

def test_multipath_namespace_needs_every_path(host, hook):
    nvme(host, A, group=1, namespaces=[])
    nvme(host, B, group=2, namespaces=[])
    head = host.multipath([A, B])
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 11, out
    assert f"{A}: {head} is also reachable through nvme1 ({B}), which stay(s) with the host" in out
    assert host.driver_of(A) == host.driver_of(B) == "nvme"

    host.vm_config(101, f"hostpci0: {A}\nhostpci1: {B}\n")
    code, out = hook(101, "pre-start")
    assert code == 0, out
    assert host.driver_of(A) == host.driver_of(B) == "vfio-pci"


def test_multipath_with_one_path_passes(host, hook):
    nvme(host, A, group=1, namespaces=[])
    head = host.multipath([A])
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert f"nvme ({head})" in out


# -- item 6: what qemu-server refuses after pre-start ---------------------------------------

@pytest.mark.parametrize("machine, code", [
    ("", 1), ("machine: pc\n", 1), ("machine: pc-i440fx-9.2\n", 1), ("machine: q35x\n", 1),
    ("machine: q35\n", 0), ("machine: pc-q35-9.2+pve1\n", 0),
    ("machine: type=q35,viommu=intel\n", 0),
])
def test_pcie_needs_q35(host, hook, machine, code):
    nvme(host)
    host.vm_config(100, f"{machine}hostpci0: {A},pcie=1\n")
    rc, out = hook(100, "pre-start")
    assert rc == code, out
    if code:
        assert 'qemu-server refuses to start the VM: "q35 machine model is not enabled"' in out
        assert host.driver_of(A) == "nvme"


@pytest.mark.parametrize("value, expect", [
    (f"{A},pcie=1,bogus=2", "invalid key in comma-separated list property: bogus"),
    (f"{A},rombar=maybe", "rombar: type check ('boolean') failed - got 'maybe'"),
    (f"{A},vendor-id=8086", "vendor-id: value does not match the regex pattern"),
])
def test_hostpci_value_qemu_server_drops(host, hook, value, expect):
    nvme(host)
    host.vm_config(100, f"hostpci0: {value}\n")
    code, out = hook(100, "pre-start")
    assert code == 1 and expect in out, out
    assert "would start the VM without the device" in out
    assert host.driver_of(A) == "nvme"


def _mapping(host, line):
    host.root.pve("mapping").mkdir(parents=True, exist_ok=True)
    host.root.pve("mapping", "pci.cfg").write_text(f"disk\n\tmap node=pve1,{line}\n")
    host.vm_config(100, "hostpci0: mapping=disk\n")


@pytest.mark.parametrize("line, sub, expect", [
    (f"path={A},id=1b36:0011,iommugroup=1", False,
     "'id' does not match for 'disk' (1b36:0010 != 1b36:0011)"),
    (f"path={A},id=1B36:0010,iommugroup=1", False,
     "'id' does not match for 'disk' (1b36:0010 != 1B36:0010)"),
    (f"path={A},id=1b36:0010,iommugroup=4", False,
     "'iommugroup' does not match for 'disk' (1 != 4)"),
    (f"path={A},id=1b36:0010", False, f"missing expected property 'iommugroup' for device '{A}'"),
    (f"path={A},id=1b36:0010,iommugroup=1", True,
     f"missing expected property 'subsystem-id' for device '{A}'"),
    (f"path={A},id=1b36:0010,iommugroup=1,subsystem-id=1af4:1101", True,
     "'subsystem-id' does not match for 'disk' (1af4:1100 != 1af4:1101)"),
    (f"path={A},id=1b36:0010,iommugroup=1,subsystem-id=1af4:1100", False,
     f"unexpected property 'subsystem-id' configured for device '{A}'"),
])
def test_mapping_that_does_not_match_the_device(host, hook, line, sub, expect):
    nvme(host)
    if sub:
        (host.device_dir(A) / "subsystem_vendor").write_text("0x1af4\n")
        (host.device_dir(A) / "subsystem_device").write_text("0x1100\n")
    _mapping(host, line)
    code, out = hook(100, "pre-start")
    assert code == 3, out
    assert "PCI device mapping invalid (hardware probably changed): " + expect in out
    assert host.driver_of(A) == "nvme"


def test_mapping_that_matches(host, hook):
    nvme(host)
    (host.device_dir(A) / "subsystem_vendor").write_text("0x1af4\n")
    (host.device_dir(A) / "subsystem_device").write_text("0x1100\n")
    _mapping(host, f"path={A.removesuffix('.0')},id=1b36:0010,iommugroup=1,subsystem-id=1af4:1100")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert host.driver_of(A) == "vfio-pci"


def test_legacy_igd_rules(host, hook):
    host.add_pci("0000:00:02.0", cls=GPU_CLASS, vendor=0x8086, device=0x3E92, group=2,
                 driver="i915")
    host.vm_config(100, "hostpci0: 00:02.0,legacy-igd=1\n")
    code, out = hook(100, "pre-start")
    assert code == 1 and "legacy IGD assignment requires VGA mode to be 'none'" in out
    host.vm_config(100, "vga: none\nhostpci0: 00:02.0,legacy-igd=1\n")
    assert hook(100, "pre-start")[0] == 0


# -- item 8: mapping alternatives chosen under the locks ------------------------------------

def _wait_for_open(pid: int, path, deadline_s: float = 30.0) -> None:
    """Wait until process `pid` has `path` open (it reached the lock)."""
    import time

    end = time.monotonic() + deadline_s
    target = os.path.realpath(path)
    while time.monotonic() < end:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            break
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return
            except OSError:
                continue
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never opened {path}")


def test_a_start_takes_the_next_alternative_another_start_took(host, ctx, tmp_path):
    """VM 200's start holds the first alternative's lock and takes it; VM 100's start,
    waiting for that lock, then chooses the second instead of being refused."""
    from pvehook import rebind
    from pvehook.hook import run
    from pvehook.records import DeviceRecord, VmRecord, device_locks
    from pvehook.pci import PciAddress, PciDevice

    nvme(host, A, group=1)
    nvme(host, B, group=2)
    host.add_driver("vfio-pci")
    host.root.pve("mapping").mkdir(parents=True)
    host.root.pve("mapping", "pci.cfg").write_text(
        f"disk\n\tmap node=pve1,path={A},id=1b36:0010,iommugroup=1\n"
        f"\tmap node=pve1,path={B},id=1b36:0010,iommugroup=2\n")
    host.vm_config(100, "hostpci0: mapping=disk\n")
    log = tmp_path / "vm100.log"
    go_r, go_w = os.pipe()
    pid = os.fork()  # before the lock: a child would inherit the lock's open file
    if pid == 0:
        os.read(go_r, 1)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os._exit(run(["100", "pre-start"], ctx))
    with device_locks(ctx.root, [A], 5):  # VM 200's pre-start, in the middle of its run
        os.write(go_w, b"x")
        _wait_for_open(pid, ctx.root.lock_dir / f"{A}.lock")
        ctx.records.save(VmRecord(200, [DeviceRecord(A, "nvme", 1)]))
        assert rebind.move(ctx.kernel, [(PciDevice(ctx.root, PciAddress.parse(A)), "vfio-pci")]) == {}
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    assert code == 0, log.read_text()
    assert host.driver_of(B) == "vfio-pci"
    assert [d["address"] for d in record(host, 100)["devices"]] == [B]
    assert [d["address"] for d in record(host, 200)["devices"]] == [A]


def test_two_starts_with_the_same_mapping_both_start(host, ctx):
    """Two pre-starts at once, in two processes, one mapping with two alternatives."""
    nvme(host, A, group=1)
    nvme(host, B, group=2)
    for addr in (A, B):
        host.fault(addr, "unbind", "delay", 0.3)  # widen the window
    host.root.pve("mapping").mkdir(parents=True)
    host.root.pve("mapping", "pci.cfg").write_text(
        f"disk\n\tmap node=pve1,path={A},id=1b36:0010,iommugroup=1\n"
        f"\tmap node=pve1,path={B},id=1b36:0010,iommugroup=2\n")
    host.vm_config(100, "hostpci0: mapping=disk\n")
    host.vm_config(200, "hostpci0: mapping=disk\n")
    codes = start_together(ctx, (100, 200))
    assert codes == [0, 0]
    assert host.driver_of(A) == host.driver_of(B) == "vfio-pci"
    taken = sorted(d["address"] for v in (100, 200) for d in record(host, v)["devices"])
    assert taken == [A, B]


def test_a_controller_that_appears_while_waiting_for_the_locks_is_not_taken(host, ctx):
    """Only locked devices are moved: one hot-plugged between prepare and choose is refused."""
    from pvehook.plan import check, choose, prepare

    nvme(host, "0000:01:00.0", group=1)
    host.vm_config(100, "hostpci0: 01:00\n")  # every function of the slot
    plan = prepare(ctx, 100)
    assert plan.candidates == ["0000:01:00.0"]
    nvme(host, "0000:01:00.1", group=1)
    choose(ctx, plan)
    check(ctx, plan)
    assert [e.exit_code for e in plan.refusals] == [12]
    assert "0000:01:00.1 appeared while this start waited for its locks" in str(plan.refusals[0])


def test_an_empty_dvd_drive_in_the_group_does_not_break_the_check(host, hook, monkeypatch):
    import errno

    from fakesys import FakeKernel

    gpu(host)
    host.add_pci(SATA, cls=AHCI_CLASS, vendor=0x8086, device=0xA352, group=6, driver="ahci")
    host.add_scsi_disk(SATA, "sr0")
    real = FakeKernel.open_exclusive

    def no_medium(self, path):
        if path.name == "sr0":
            raise OSError(errno.ENOMEDIUM, os.strerror(errno.ENOMEDIUM))
        return real(self, path)

    monkeypatch.setattr(FakeKernel, "open_exclusive", no_medium)
    host.vm_config(100, f"hostpci0: {GPU}\n")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert "sr0 has no medium" in out
