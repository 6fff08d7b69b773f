"""IOMMU groups and whether one can go to a VM without taking anything from the host.

VFIO hands out a whole group: every member must be unbound, on vfio-pci, or a bridge
(Documentation/driver-api/vfio.rst, "viable" groups). qemu-server binds every member but
bridges with a secondary bus to vfio-pci without asking; `member_verdicts` is the coarse
view for `pvehook status` (a member on a host driver: "host"), plan.check_groups the
pre-start check (what the host actually uses on each member).
"""

from __future__ import annotations

import os
from collections import namedtuple

from .paths import Root
from .pci import PciAddress, PciDevice

VFIO = "vfio-pci"


def iommu_enabled(root: Root) -> bool:
    try:
        return bool(os.listdir(root.sys("class", "iommu")))
    except FileNotFoundError:
        return False


def group_members(root: Root, group: str) -> list[PciDevice]:
    try:
        names = sorted(os.listdir(root.sys("kernel", "iommu_groups", group, "devices")))
    except FileNotFoundError:
        return []
    return [PciDevice(root, PciAddress.parse(n)) for n in names]


class Member(namedtuple("Member", "device driver verdict")):
    """One function of a group; `verdict`: why it is fine, or "host" when the host uses it."""

    __slots__ = ()

    @property
    def ok(self) -> bool:
        return self.verdict != "host"


def member_verdicts(root: Root, group: str, passed: set[PciAddress]) -> list[Member]:
    """Each member with the reason it does or does not block giving the group away."""
    out = []
    for m in group_members(root, group):
        drv = m.driver
        if m.address in passed:
            verdict = "passed to this VM"
        elif root.sys("bus", "pci", "devices", str(m.address), "pci_bus").is_dir():
            # qemu-server skips only bridges with a bus behind them (SysFSTools
            # pci_dev_group_bind_to_vfio); an ISA/LPC bridge goes to vfio-pci too
            verdict = "bridge"
        elif drv is None:
            verdict = "unbound"
        elif drv == VFIO:
            verdict = "on vfio-pci"
        else:
            verdict = "host"
        out.append(Member(m, drv, verdict))
    return out
