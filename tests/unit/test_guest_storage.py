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
from pvehook import guestlist
from pvehook.errors import InUseError, Refusals
from pvehook.reserve import reserve, reserved_by_vm, unreserve

A, B, C = "0000:01:00.0", "0000:02:00.0", "0000:03:00.0"


def nvme(host, addr, group):
    return host.add_pci(addr, group=group, serial=f"S-{addr}",
                        namespaces=[FakeNamespace(partitions=1)])


def listed(host, kind):
    d = host.root.lib_dir / kind
    return sorted(os.listdir(d)) if d.is_dir() else []


def test_pre_start_lists_the_vms_controllers_for_boot(host, hook):
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
    assert hook(101, "pre-start")[0] == 0
    assert hook(101, "post-stop")[0] == 0
    assert (d / B).read_text() == "100\n101\n"
    host.vm_config(100, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0
    assert (d / B).read_text() == "101\n"
    assert listed(host, "guest") == [A, B]


def test_a_refused_start_still_lists_the_controller(host, hook):
    # The host uses the disk now (say, the guest's VG the host activated and mounted);
    # listing it anyway keeps the next boot from activating it again.
    nvme(host, A, 1)
    host.mount(host.namespaces_of(A)[1], "/mnt")
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == InUseError.exit_code, out
    assert listed(host, "guest") == [A]


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
