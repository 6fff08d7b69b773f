"""The guest's storage from boot on (issue 11, item 1), on the fake kernel: which addresses
the node lists for the package's udev rule and the boot-time reservation, and what
`pvehook reserve`/`unreserve` do to the devices. The rules themselves act on the real
kernel: tests/vm/test_boot_vm.py."""

from __future__ import annotations

import json
import os
import stat

import pytest

from fakesys import FakeNamespace
from pvehook.errors import InUseError, Refusals
from pvehook.reserve import reserve, reserved_by_vm, unreserve

A, B, C = "0000:01:00.0", "0000:02:00.0", "0000:03:00.0"


def nvme(host, addr, group, partitions=1):
    return host.add_pci(addr, group=group, serial=f"S-{addr}",
                        namespaces=[FakeNamespace(partitions=partitions)])


def listed(host, kind):
    d = host.root.lib_dir / kind
    return sorted(os.listdir(d)) if d.is_dir() else []


def test_pre_start_lists_the_vms_controllers_for_boot(host, ctx, hook):
    nvme(host, A, 1)
    nvme(host, B, 2)
    nvme(host, C, 3)
    host.vm_config(100, f"hostpci0: {A}\nhostpci1: {B}\n")
    host.vm_config(101, f"hostpci0: {B}\n")
    assert hook(100, "pre-start")[0] == 0
    assert listed(host, "guest") == [A, B]  # never C: the host's own disk stays the host's
    d = host.root.lib_dir / "guest"
    assert stat.S_IMODE(os.stat(host.root.lib_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d / A).st_mode) == 0o600
    assert (d / A).read_text() == "100\n"
    assert hook(100, "post-stop")[0] == 0
    # B is also VM 101's; once VM 100 passes only A, B stays listed for 101 alone.
    from pvehook.pins import accept

    accept(ctx, 101)  # B is VM 100's pinned drive: VM 101 takes it only when told to
    assert hook(101, "pre-start")[0] == 0
    assert hook(101, "post-stop")[0] == 0
    assert (d / B).read_text() == "100\n101\n"
    host.vm_config(100, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0
    assert (d / B).read_text() == "101\n"
    assert listed(host, "guest") == [A, B]


def test_a_refused_start_does_not_list_the_controller(host, hook):
    # The host uses the disk now: it may be the host's own disk that a renumbering or a
    # wrong hostpci line put here. Listed, the host would leave its LVM/md inactive at
    # the next boot; only a start that passed every check lists its controllers.
    nvme(host, A, 1)
    host.mount(host.namespaces_of(A)[1], "/mnt")
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == InUseError.exit_code, out
    assert listed(host, "guest") == []


def test_reserve_moves_lists_and_survives_the_hook(host, ctx, hook):
    nvme(host, A, 1)
    nvme(host, B, 2)
    host.vm_config(100, f"hostpci0: {A}\n")
    lines: list[str] = []
    assert reserve(ctx, 100, lines.append) == [A]
    assert host.driver_of(A) == "vfio-pci"
    assert host.driver_of(B) == "nvme"
    assert listed(host, "reserved") == [A]
    assert listed(host, "guest") == [A]
    assert reserved_by_vm(ctx) == {100: [A]}
    assert any(f"{A} nvme -> vfio-pci" in line for line in lines)
    # A start and a stop leave it on vfio-pci: it was there before pre-start.
    assert hook(100, "pre-start")[0] == 0
    code, out = hook(100, "post-stop")
    assert code == 0, out
    assert host.driver_of(A) == "vfio-pci"
    assert f"{A} stays on vfio-pci" in out


def test_reserve_refuses_a_disk_the_host_uses(host, ctx):
    nvme(host, A, 1)
    host.mount(host.namespaces_of(A)[1], "/srv")
    host.vm_config(100, f"hostpci0: {A}\n")
    with pytest.raises(Refusals) as e:
        reserve(ctx, 100, lambda _l: None)
    assert e.value.exit_code == InUseError.exit_code
    assert host.driver_of(A) == "nvme"
    assert listed(host, "reserved") == []


def test_reserve_of_a_running_vm_keeps_the_device_at_its_post_stop(host, ctx, hook):
    nvme(host, A, 1)
    host.vm_config(100, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0
    reserve(ctx, 100, lambda _l: None)
    rec = json.loads((host.root.state_dir / "100.json").read_text())
    assert rec["devices"][0]["original_driver"] == "vfio-pci"
    assert hook(100, "post-stop")[0] == 0
    assert host.driver_of(A) == "vfio-pci"


def test_unreserve_gives_back_a_stopped_vms_controller(host, ctx):
    nvme(host, A, 1)
    host.vm_config(100, f"hostpci0: {A}\n")
    reserve(ctx, 100, lambda _l: None)
    lines: list[str] = []
    assert unreserve(ctx, 100, lines.append) == [A]
    assert host.driver_of(A) == "nvme"
    assert (host.device_dir(A) / "driver_override").read_text().strip() == "(null)"
    assert listed(host, "reserved") == []
    assert listed(host, "guest") == [A]  # still the guest's disk: LVM stays off it
    assert unreserve(ctx, 100, lines.append) == []


# -- pre-start's safety net and the VG name clash, against stand-in lvm2 and mdadm --------

BIN = os.path.join(os.path.dirname(__file__), "bin_storage")


class Storage:
    """The stand-in lvm2's state (tests/unit/bin_storage/lvm) plus the dm/md holders the
    kernel would show in the fake tree."""

    def __init__(self, host, tmp_path, monkeypatch):
        self.host = host
        self.path = tmp_path / "lvm.json"
        self.mdlog = tmp_path / "mdadm.log"
        self.state = {"pvs": [], "lvs": []}
        self.minor = 0
        monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("PVEHOOK_ROOT", str(host.base))
        monkeypatch.setenv("PVEHOOK_FAKE_LVM_STATE", str(self.path))
        monkeypatch.setenv("PVEHOOK_FAKE_MDADM_LOG", str(self.mdlog))
        self.save()

    def save(self):
        self.path.write_text(json.dumps(self.state))

    def vg(self, name, uuid, pvs, active=True, lv_open=False):
        """A VG with one LV `lv` on `pvs` (kernel names); active: its dm device holds them."""
        dm = f"dm-{self.minor}"
        self.minor += 1
        for pv in pvs:
            self.state["pvs"].append({"pv_name": f"/dev/{pv}", "vg_name": name, "vg_uuid": uuid})
            if active:
                self.host.hold(pv, holder=dm, dm_name=f"{name}-lv", uuid=f"LVM-{uuid}")
        self.state["lvs"].append({"vg_uuid": uuid, "lv_name": "lv", "dm": dm,
                                  "lv_active": "active" if active else "",
                                  "lv_device_open": "open" if lv_open else ""})
        self.save()

    def md(self, name, members):
        root = self.host.root
        d = root.sys("devices", "virtual", "block", name)
        (d / "holders").mkdir(parents=True)
        (d / "slaves").mkdir()
        (d / "dev").write_text(f"9:{self.minor}\n")
        self.minor += 1
        root.sys("class", "block").mkdir(parents=True, exist_ok=True)
        root.sys("class", "block", name).symlink_to(d)
        for m in members:
            (d / "slaves" / m).symlink_to(self.host.block(m))
            (self.host.block(m) / "holders" / name).symlink_to(d)

    def active(self):
        return sorted(lv["vg_uuid"] for lv in json.loads(self.path.read_text())["lvs"]
                      if lv["lv_active"] == "active")


@pytest.fixture
def storage(host, tmp_path, monkeypatch):
    nvme(host, A, 1, partitions=2)
    nvme(host, B, 2)
    return Storage(host, tmp_path, monkeypatch)


def test_safety_net_deactivates_an_unused_guest_vg(host, hook, storage):
    p1 = host.namespaces_of(A)[1]
    storage.vg("guestvg", "U1", [p1])
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert f"deactivated volume group guestvg on {p1}" in out
    assert storage.active() == []
    assert host.driver_of(A) == "vfio-pci"


def test_a_start_refused_for_another_reason_deactivates_nothing(host, hook, storage):
    """The safety net acts only once every check passed: here the other partition of the
    disk is mounted (the host uses it, perhaps it is the host's own disk), so the guest
    VG on the first one stays active and the controller stays on nvme."""
    p1, p2 = host.namespaces_of(A)[1:3]
    storage.vg("guestvg", "U1", [p1])
    host.mount(p2, "/srv")
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 11, out
    assert f"would deactivate volume group guestvg on {p1}" in out
    assert storage.active() == ["U1"]
    assert host.driver_of(A) == "nvme"


def test_safety_net_leaves_an_open_lv_and_the_start_is_refused(host, hook, storage):
    p1 = host.namespaces_of(A)[1]
    storage.vg("guestvg", "U1", [p1], lv_open=True)
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == InUseError.exit_code, out
    assert "volume group guestvg" in out and "is in use on the host (open: lv)" in out
    assert storage.active() == ["U1"]
    assert host.driver_of(A) == "nvme"


def test_safety_net_leaves_a_vg_with_pvs_outside_the_vm(host, hook, storage):
    a1, b1 = host.namespaces_of(A)[1], host.namespaces_of(B)[1]
    storage.vg("spanning", "U1", [a1, b1])
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == InUseError.exit_code, out
    assert f"also has PVs on {b1}, which this VM is not given" in out
    assert storage.active() == ["U1"]
    # Passed both controllers, the VG lies wholly on the VM's disks: deactivated.
    host.vm_config(100, f"hostpci0: {A}\nhostpci1: {B}\n")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert storage.active() == []


def test_safety_net_stops_an_unused_md_array(host, hook, storage):
    _disk, p1, p2 = host.namespaces_of(A)
    storage.md("md0", [p1, p2])
    host.vm_config(100, f"hostpci0: {A}\n")
    host.mount("md0", "/srv")
    code, out = hook(100, "pre-start")
    assert code == InUseError.exit_code, out
    assert "md array md0 is in use on the host (md0 mounted or swap)" in out
    assert not storage.mdlog.exists()
    host.root.proc("self", "mountinfo").write_text("")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert f"stopped md array md0 on {p1}, {p2}" in out
    assert storage.mdlog.read_text() == "stop md0\n"


def test_vg_name_clash_is_found_and_deactivation_goes_by_uuid(host, storage):
    from pvehook.block import namespaces
    from pvehook.lvm import deactivate_guest_vgs, name_clashes
    from pvehook.pci import PciAddress, PciDevice

    _disk, p1, p2 = host.namespaces_of(A)
    for p in (p1, p2):  # what blkid tells udev
        data = host.root.run("udev", "data", f"b{host.devnum(p)}")
        data.write_text(data.read_text() + "E:ID_FS_TYPE=LVM2_member\n")
    storage.state["pvs"].append({"pv_name": "/dev/vda", "vg_name": "pve", "vg_uuid": "H0"})
    storage.state["lvs"].append({"vg_uuid": "H0", "lv_name": "root", "dm": "dm-9",
                                 "lv_active": "active", "lv_device_open": "open"})
    storage.vg("pve", "G1", [p1])
    storage.vg("guestvg", "G2", [p2], active=False)
    disks = namespaces(PciDevice(host.root, PciAddress.parse(A)))
    assert name_clashes(disks) == [("pve", ["/dev/vda"])]
    assert deactivate_guest_vgs(host.root, disks) == ["pve"]
    assert storage.active() == ["H0"]  # the host's own pve untouched


def test_status_warns_of_a_vg_name_clash(host, storage, monkeypatch, capsys):
    from pvehook.cli import main

    _disk, p1, _p2 = host.namespaces_of(A)
    data = host.root.run("udev", "data", f"b{host.devnum(p1)}")
    data.write_text(data.read_text() + "E:ID_FS_TYPE=LVM2_member\n")
    storage.state["pvs"].append({"pv_name": "/dev/vda", "vg_name": "pve", "vg_uuid": "H0"})
    storage.vg("pve", "G1", [p1], active=False)
    with pytest.raises(SystemExit) as e:
        main(["status", "--json"])
    assert e.value.code == 0
    data = {c["address"]: c for c in json.loads(capsys.readouterr().out)}
    assert data[A]["vg_name_clashes"] == [{"vg": "pve", "other_pvs": ["/dev/vda"]}]
    assert data[B]["vg_name_clashes"] == []
    with pytest.raises(SystemExit):
        main(["status"])
    assert "its volume group 'pve' has the name of the host's on /dev/vda" in capsys.readouterr().out


def test_check_says_what_the_safety_net_would_do_and_exits_like_the_hook(host, storage,
                                                                          hook, ctx):
    from pvehook.plan import dry_run

    _disk, p1, p2 = host.namespaces_of(A)
    storage.vg("guestvg", "U1", [p1])
    storage.md("md0", [p2])
    host.vm_config(100, f"hostpci0: {A}\n")
    plan = dry_run(ctx, 100)
    assert plan.refusals == []
    assert any(f"would deactivate volume group guestvg on {p1}" in line for line in plan.lines)
    assert any("would stop md array md0" in line for line in plan.lines)
    assert storage.active() == ["U1"] and not storage.mdlog.exists()  # nothing changed
    assert [str(s.device.address) for s in plan.steps] == [A]
    assert hook(100, "pre-start")[0] == 0
