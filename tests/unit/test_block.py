"""Finding a controller's namespaces, with and without native NVMe multipath."""

from __future__ import annotations

import os

from fakesys import FakeNamespace
from pvehook.block import controller_serial, namespaces
from pvehook.pci import PciAddress, PciDevice

A = "0000:01:00.0"


def test_plain_namespaces_and_partitions(host):
    host.add_pci(A, group=1, serial="S1",
                 namespaces=[FakeNamespace(partitions=2), FakeNamespace()])
    dev = PciDevice(host.root, PciAddress.parse(A))
    disks = namespaces(dev)
    assert [d.name for d in disks] == ["nvme0n1", "nvme0n2"]
    assert [p.name for p in disks[0].partitions()] == ["nvme0n1p1", "nvme0n1p2"]
    assert disks[0].udev()["ID_SERIAL"] == "QEMU_NVMe_Ctrl_S1_1"
    assert controller_serial(dev) == "S1"


def test_multipath_paths_lead_to_the_shared_head(host):
    """With native multipath the controller holds hidden paths nvme<S>c<C>n<N>; the disk
    is the head nvme<S>n<N> under the subsystem, in /sys/block."""
    host.add_pci(A, group=1, driver=None)
    sys = host.sys
    ctrl = host.device_dir(A) / "nvme" / "nvme3"
    (ctrl / "nvme1c3n1").mkdir(parents=True)  # hidden path: no dev, no /sys/block entry
    (ctrl / "serial").write_text("MP1\n")
    head = sys / "devices/virtual/nvme-subsystem/nvme-subsys1/nvme1n1"
    (head / "holders").mkdir(parents=True)
    (head / "dev").write_text("259:7\n")
    for d in ("block", "class/block"):
        os.symlink(os.path.relpath(head, sys / d), sys / d / "nvme1n1")
    dev = PciDevice(host.root, PciAddress.parse(A))
    assert [d.name for d in namespaces(dev)] == ["nvme1n1"]
    assert namespaces(dev)[0].devnum == "259:7"


def test_unbound_controller_has_no_namespaces(host):
    host.add_pci(A, group=1, driver=None, namespaces=[FakeNamespace()])
    assert namespaces(PciDevice(host.root, PciAddress.parse(A))) == []
