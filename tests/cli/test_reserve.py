"""`pvehook reserve` / `unreserve` through the CLI, and how `status` and `list` show a
reservation (the decisions themselves: tests/unit/test_guest_storage.py)."""

from __future__ import annotations

import json
import os

import pytest

from fakesys import FakeKernel, FakeNamespace
from pvehook import guestlist
from pvehook.context import Context

A = "0000:01:00.0"


def nvme(host, addr=A, group=1):
    host.add_pci(addr, group=group, serial=f"S-{addr}", namespaces=[FakeNamespace(partitions=1)])


@pytest.fixture
def fake_kernel(node, monkeypatch):
    import pvehook.cli.reserve as reserve

    monkeypatch.setattr(reserve, "context",
                        lambda: Context(root=node.root, kernel=FakeKernel(node), node="pve1"))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    return node


def test_reserve_and_unreserve(fake_kernel, cli):
    node = fake_kernel
    nvme(node)
    node.vm_config(100, f"hostpci0: {A}\n")
    code, out, err = cli("reserve", 100)
    assert code == 0, err
    assert node.driver_of(A) == "vfio-pci"
    assert f"{A} reserved for VM 100" in out
    code, out, err = cli("unreserve", 100, "--json")
    assert code == 0, err
    assert json.loads(out)["unreserved"] == [A]
    assert node.driver_of(A) == "nvme"


def test_reserve_refused_exits_like_the_hook(fake_kernel, cli):
    node = fake_kernel
    nvme(node)
    node.mount(node.namespaces_of(A)[0], "/srv")
    node.vm_config(100, f"hostpci0: {A}\n")
    code, _out, err = cli("reserve", 100)
    assert code == 11, err
    assert "the host uses this disk" in err
    assert node.driver_of(A) == "nvme"


def test_reserve_needs_root(node, cli, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code, _out, err = cli("reserve", 100)
    assert code == 4, err


def test_status_and_list_show_the_reservation(node, cli):
    nvme(node)
    node.vm_config(100, f"hostpci0: {A}\nhookscript: local:snippets/pvehook-hook\n")
    guestlist.set_vm(node.root, guestlist.RESERVED, 100, {A})
    code, out, err = cli("status")
    assert code == 0, err
    assert "reserved for VM 100: on vfio-pci from boot on" in out
    data = json.loads(cli("status", "--json")[1])
    assert data[0]["reserved_for"] == [100]
    code, out, err = cli("list", "--json")
    assert code == 0, err
    assert json.loads(out)[0]["reserved"] == [A]


def test_register_lists_the_vms_controllers_for_boot(cluster, cli, host):
    nvme(host)
    nvme(host, "0000:02:00.0", group=2)
    cluster.vm(100, f"memory: 2048\nhostpci0: {A}\n")
    code, _out, err = cli("register", 100, "--enable-snippets", "local")
    assert code == 0, err
    assert sorted(os.listdir(host.root.lib_dir / "guest")) == [A]
    assert (host.root.lib_dir / "guest" / A).read_text() == "100\n"
