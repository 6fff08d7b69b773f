"""pre-start's decisions: read the kernel's view of every device, then decide.

Nothing here changes the system. The CLI's `check` prints the same plan.
"""

from __future__ import annotations

from collections import namedtuple

from . import iommu
from .block import namespaces
from .context import Context
from .errors import (
    DeviceNotFoundError, HeldByOtherVMError, InUseError, IommuError, PvehookError,
)
from .holds import Holds
from .pci import PciAddress, PciDevice
from .resolve import resolve_vm
from .usage import host_use
from .vmconfig import VmConfig

VFIO = iommu.VFIO


class Step(namedtuple("Step", "device original_driver namespaces taken_from",
                        defaults=(None,))):
    """Bind `device` to vfio-pci; undo: give it back to `original_driver` and wait for
    `namespaces` disks. `taken_from`: the VM whose stale record this device leaves."""

    __slots__ = ()


class Plan:
    def __init__(self, vmid: int):
        self.vmid = vmid
        self.lines: list[str] = []  # one per decision
        self.refusals: list[PvehookError] = []
        self.steps: list[Step] = []  # devices to move to vfio-pci
        self.stays: list[Step] = []  # already on vfio-pci: recorded only


def resolve(ctx: Context, config: VmConfig, plan: Plan) -> tuple[list[PciDevice], set[PciAddress]]:
    """The NVMe controllers of this VM that the hook manages, and every PCI function the
    VM is given; one line for each device left to Proxmox."""
    if not config.hostpci:
        plan.lines.append(f"VM {config.vmid} has no hostpci devices: nothing to do")
        return [], set()
    existing = [d.address for d in PciDevice.all(ctx.root)]
    mappings = {}
    if any(e.mapping for e in config.hostpci):
        from .mapping import load_pci_mappings

        mappings = load_pci_mappings(ctx.root)
    holds = Holds(ctx.root, ctx.journal, config.vmid)
    try:
        resolved = resolve_vm(config, existing, mappings, ctx.node, holds.is_taken)
    except DeviceNotFoundError as e:
        plan.refusals.append(e)
        return [], set()
    passed = {a for _, addresses in resolved for a in addresses}
    managed = []
    for entry, addresses in resolved:
        if entry.keeps_driver:
            plan.lines.append(f"{entry.key}: driver=keep, left as it is")
            continue
        if entry.mdev is not None:
            plan.lines.append(f"{entry.key}: mediated device, left to Proxmox")
            continue
        for addr in addresses:
            dev = PciDevice(ctx.root, addr)
            if not dev.is_nvme:
                plan.lines.append(f"{entry.key}: {addr} (class {dev.class_code:06x}) is not an"
                                  " NVMe controller, left to Proxmox")
            else:
                managed.append(dev)
    return managed, passed


def check_device(ctx: Context, dev: PciDevice, passed: set[PciAddress], holds: Holds,
                 plan: Plan) -> None:
    """Append the device's refusals, or its step, to the plan."""
    addr = dev.address
    refused = len(plan.refusals)
    if not iommu.iommu_enabled(ctx.root):
        plan.refusals.append(IommuError(
            f"{addr}: the IOMMU is off (/sys/class/iommu is empty)",
            hint="enable VT-d/AMD-Vi in the firmware and add intel_iommu=on (Intel) to the"
                 " kernel command line, then reboot"))
        return
    group = dev.iommu_group
    if group is None:
        plan.refusals.append(IommuError(f"{addr} has no IOMMU group",
                                        hint="check that the IOMMU covers this slot"))
        return
    offenders = [m for m in iommu.member_verdicts(ctx.root, group, passed) if not m.ok]
    if offenders:
        names = ", ".join(f"{m.device.address} ({m.driver}, class {m.device.class_code:06x})"
                          for m in offenders)
        plan.refusals.append(IommuError(
            f"{addr}: IOMMU group {group} is shared with devices the host uses: {names}",
            hint="pass those devices to this VM as well, or put the NVMe in a slot with its"
                 " own group (see `pvehook iommu`)"))
    holder = holds.holder(addr)
    if holder:
        plan.refusals.append(HeldByOtherVMError(
            f"{addr} is held by {holder}", hint="stop that VM first, or pass another device"))
    driver = dev.driver
    disks = namespaces(dev) if driver else []
    if disks:
        use = host_use(ctx.root, ctx.kernel, disks)
        if use.in_use:
            plan.refusals.append(InUseError(
                f"{addr}: the host uses this disk: " + "; ".join(use.reasons),
                hint="stop using it on the host (umount, swapoff, vgchange -an, zpool export)"
                     " or pass another disk"))
        for note in use.notes:
            plan.lines.append(f"{addr}: {note}")
    if len(plan.refusals) > refused:
        return
    stale = holds.stale_record(addr)  # a whole record is stale, whatever the driver now
    if driver == VFIO:
        original = stale[1].original_driver if stale else VFIO
        if stale:
            plan.lines.append(f"{addr}: left on vfio-pci by VM {stale[0].vmid}, which no longer"
                              f" runs; taken over (goes back to {original or 'no driver'})")
        else:
            plan.lines.append(f"{addr}: already on vfio-pci, stays")
        plan.stays.append(Step(dev, original, stale[1].namespaces if stale else 0,
                               stale[0].vmid if stale else None))
    else:
        names = ", ".join(d.name for d in disks) or "no namespaces"
        plan.lines.append(f"{addr}: {driver or 'no driver'} ({names}), IOMMU group {group}"
                          " isolated, not used by the host")
        plan.steps.append(Step(dev, driver, len(disks), stale[0].vmid if stale else None))


def check(ctx: Context, plan: Plan, managed: list[PciDevice], passed: set[PciAddress]) -> None:
    """Check every managed device; all are checked before anything changes."""
    holds = Holds(ctx.root, ctx.journal, plan.vmid)
    plan.lines += holds.notes
    for dev in managed:
        check_device(ctx, dev, passed, holds, plan)


def prepare(ctx: Context, vmid: int) -> tuple[Plan, list[PciDevice], set[PciAddress]]:
    """What needs no lock: the config, its LVM volumes, its devices. `check` follows,
    under the device locks in the hook, without them in the CLI's dry run."""
    from .volumes import confirm_volumes

    config = VmConfig.load(ctx.root, vmid)
    plan = Plan(vmid)
    lines, refusals = confirm_volumes(ctx, config)
    plan.lines += lines
    plan.refusals += refusals
    managed, passed = resolve(ctx, config, plan)
    return plan, managed, passed


def dry_run(ctx: Context, vmid: int) -> Plan:
    """pre-start's decisions without locks and without changing anything."""
    plan, managed, passed = prepare(ctx, vmid)
    if not plan.refusals and managed:
        check(ctx, plan, managed, passed)
    return plan
