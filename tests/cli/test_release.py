"""`pvehook release <vmid>`: the devices of a stopped VM back to the host, never those
of a running one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fakesys import FakeKernel, FakeNamespace

A = "0000:01:00.0"


@pytest.fixture
def assigned(node, hook, monkeypatch):
    """VM 100 after a pre-start; the CLI's kernel is the fake one."""
    import pvehook.context

    monkeypatch.setattr(pvehook.context, "Kernel", lambda: FakeKernel(node))
    node.add_pci(A, group=1, serial="S1", namespaces=[FakeNamespace(partitions=1)])
    node.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert node.driver_of(A) == "vfio-pci"
    return node


def test_release_gives_back_the_devices_of_a_stopped_vm(assigned, cli):
    code, out, err = cli("release", 100)
    assert code == 0, err
    assert f"{A} vfio-pci -> nvme" in out
    assert assigned.driver_of(A) == "nvme"
    assert len(assigned.namespaces_of(A)) == 2
    assert not assigned.root.state_dir.joinpath("100.json").exists()
    code, out, err = cli("release", 100)
    assert code == 0 and "nothing recorded for VM 100" in out


def test_release_refuses_while_the_vm_runs(assigned, cli):
    qemu = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assigned.root.proc(str(qemu.pid)).mkdir(parents=True)
        assigned.root.run("qemu-server", "100.pid").write_text(f"{qemu.pid}\n")
        code, out, err = cli("release", 100)
    finally:
        qemu.kill()
        qemu.wait()
    assert code == 16, err
    assert "VM 100 is running" in err and "qm shutdown 100" in err
    assert assigned.driver_of(A) == "vfio-pci"


def test_release_of_a_vm_without_record(node, cli):
    code, out, err = cli("release", 555)
    assert code == 0 and "nothing recorded for VM 555" in out


def test_release_is_in_the_help(cli):
    code, out, _ = cli("--help")
    text = " ".join(out.split())  # the help is wrapped
    assert code == 0 and "pvehook release 100" in text and "release: the VM is running" in text
