"""pre-start's decisions: read the kernel's view of every device, then decide.

Nothing here changes the system. The CLI's `check` prints the same plan.
"""

from __future__ import annotations

from collections import namedtuple

from . import iommu, qemuserver
from .block import namespaces
from .context import Context
from .errors import (
    DeviceNotFoundError, HeldByOtherVMError, InUseError, IommuError, PvehookError,
)
from .holds import Holds
from .pci import PciAddress, PciDevice
from .resolve import alternatives, resolve_vm
from .usage import host_use
from .vmconfig import HostPci, VmConfig

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
        self.config: VmConfig | None = None
        # Every NVMe function any alternative of any entry may bind: the locks to take
        # before choosing among mapping alternatives (see prepare, choose).
        self.candidates: list[str] = []
        self.managed: list[PciDevice] = []  # the NVMe controllers the hook moves
        # The entries qemu-server binds to vfio-pci with their whole IOMMU groups (all
        # but driver=keep and mdev), each with its chosen functions.
        self.bound: list[tuple[HostPci, tuple[PciAddress, ...]]] = []
        self.hostpci = False  # the VM starts with hostpci devices
        self._mappings: dict = {}
        self.entries: dict = {}  # PciAddress -> the HostPci entry of each managed device
        self.pins = None  # pins.PinCheck: the drives checked against the VM's pins


def prepare(ctx: Context, vmid: int, volumes: bool = True) -> Plan:
    """What needs no lock: the config, its LVM volumes, qemu-server's own rules for its
    hostpci entries, and the devices every alternative may bind (`plan.candidates`).
    `choose` and `check` follow, under the candidates' locks in the hook, without them
    in the CLI's dry run."""
    from .volumes import confirm_volumes

    config = VmConfig.load(ctx.root, vmid)
    plan = Plan(vmid)
    plan.config = config
    if volumes:  # False: the devices only (`pvehook pin`)
        lines, refusals = confirm_volumes(ctx, config)
        plan.lines += lines
        plan.refusals += refusals
    if not config.hostpci:
        plan.lines.append(f"VM {config.vmid} has no hostpci devices: nothing to do")
        return plan
    if config.is_template:  # qemu-server starts a template (for backup) without them
        plan.lines.append(f"VM {config.vmid} is a template: started without its hostpci devices")
        return plan
    plan.hostpci = True
    plan.refusals += qemuserver.hostpci_errors(config)
    existing = [d.address for d in PciDevice.all(ctx.root)]
    if any(e.mapping for e in config.hostpci):
        from .mapping import load_pci_mappings

        plan._mappings = load_pci_mappings(ctx.root)
    candidates: set[str] = set()
    for entry in config.hostpci:
        if entry.mapping is not None and entry.mapping in plan._mappings:
            # parse_hostpci checks every alternative of this node before choosing one
            mapping = plan._mappings[entry.mapping]
            errors = [e for e in (qemuserver.mapping_error(ctx.root, entry, mapping, m)
                                  for m in mapping.for_node(ctx.node)) if e]
            if errors:
                plan.refusals += errors
                continue
        try:
            alts = alternatives(entry, existing, plan._mappings, ctx.node)
        except DeviceNotFoundError as e:
            plan.refusals.append(e)
            continue
        plan.refusals += qemuserver.legacy_igd_errors(entry, alts)
        if entry.mdev is None:
            candidates.update(str(a) for alt in alts for a in alt
                              if PciDevice(ctx.root, a).is_nvme)
    plan.candidates = sorted(candidates)
    return plan


def choose(ctx: Context, plan: Plan) -> None:
    """Resolve every hostpci entry to its functions, a mapping to its first free
    alternative. The hook calls it holding the lock of every candidate, so a device
    another start is taking counts as taken here and the next alternative is chosen."""
    config = plan.config
    existing = [d.address for d in PciDevice.all(ctx.root)]
    holds = Holds(ctx.root, ctx.records, config.vmid)
    try:
        resolved = resolve_vm(config, existing, plan._mappings, ctx.node, holds.is_taken)
    except PvehookError as e:
        plan.refusals.append(e)
        return
    for entry, addresses in resolved:
        if entry.keeps_driver:
            plan.lines.append(f"{entry.key}: driver=keep, left as it is")
            continue
        if entry.mdev is not None:
            plan.lines.append(f"{entry.key}: mediated device, left to Proxmox")
            continue
        plan.bound.append((entry, addresses))
        for addr in addresses:
            dev = PciDevice(ctx.root, addr)
            if not dev.is_nvme:
                plan.lines.append(f"{entry.key}: {addr} (class {dev.class_code:06x}) is not an"
                                  " NVMe controller, left to Proxmox")
            elif str(addr) not in plan.candidates:  # not locked: the bus changed meanwhile
                plan.refusals.append(HeldByOtherVMError(
                    f"{entry.key}: {addr} appeared while this start waited for its locks",
                    hint="start the VM again"))
            else:
                plan.managed.append(dev)
                plan.entries[addr] = entry


def _via(entries: list[tuple[str, PciAddress]], but: PciAddress) -> str:
    return ", ".join(f"{key} ({addr})" for key, addr in entries if addr != but)


def check_groups(ctx: Context, plan: Plan, holds: Holds, openers=None) -> set[PciAddress]:
    """Every function that leaves the host with the VM's IOMMU groups, checked.

    qemu-server binds every member of the group of every bound entry to vfio-pci
    (pve-common SysFSTools pci_dev_group_bind_to_vfio: all but bridges with a bus behind
    them), whatever its class and whatever the host does with it. A member holding a
    disk in use or a configured network interface is refused; any other member with a
    host driver gets a line. The NVMe controllers the hook moves are checked by
    check_device. Returns every function that goes to vfio-pci.
    """
    root = ctx.root
    managed = {d.address for d in plan.managed}
    passed = {addr: entry.key for entry, addrs in plan.bound for addr in addrs}
    groups: dict[str, list[tuple[str, PciAddress]]] = {}
    for entry, addrs in plan.bound:
        for addr in addrs:
            group = PciDevice(root, addr).iommu_group
            if group is None:
                plan.refusals.append(IommuError(
                    f"{entry.key}: {addr} has no IOMMU group",
                    hint="check that the IOMMU covers this slot"))
                continue
            groups.setdefault(group, []).append((entry.key, addr))
    moving: set[PciAddress] = set()
    for group, via in groups.items():
        for m in iommu.group_members(root, group):
            if qemuserver.has_secondary_bus(root, m.address):
                continue
            moving.add(m.address)
            if m.address in managed:
                continue
            drv = m.driver
            label = f"{m.address} ({drv or 'no driver'}, class {m.class_code:06x})"
            if m.address in passed:
                where = f"{passed[m.address]} passes {label}"
            else:
                where = (f"{label} is in IOMMU group {group} with {_via(via, m.address)}, and"
                         " qemu-server binds every device of the group to vfio-pci")
            holder = holds.holder(m.address)
            if holder:
                plan.refusals.append(HeldByOtherVMError(
                    f"{where}; it is held by {holder}",
                    hint="stop that VM first, or pass another device"))
                continue
            if drv is None or drv == VFIO:
                continue
            from . import pciuse  # only for a member on a host driver

            use = pciuse.host_use(ctx, m, openers)
            if use.reasons:
                plan.refusals.append(InUseError(
                    f"{where}: the host uses it: " + "; ".join(use.reasons),
                    hint="stop using it on the host first" + (
                        f", or remove {passed[m.address]} from the VM"
                        if m.address in passed else
                        ", or move one of them to a slot with its own IOMMU group"
                        " (see `pvehook iommu`)")))
            elif m.address not in passed:
                notes = "; ".join(use.notes)
                plan.lines.append(
                    f"{label} shares IOMMU group {group} with {_via(via, m.address)}:"
                    f" qemu-server binds it to vfio-pci too (and does not give it back after"
                    f" the VM stops); the host does not use it"
                    + (f" ({notes})" if notes else ""))
    return moving


def check_device(ctx: Context, dev: PciDevice, moving: set[PciAddress], holds: Holds,
                 plan: Plan, openers=None, ignore: frozenset[str] = frozenset()) -> None:
    """Append the device's refusals, or its step, to the plan."""
    addr = dev.address
    refused = len(plan.refusals)
    group = dev.iommu_group
    if group is None:
        return  # refused in check_groups
    holder = holds.holder(addr)
    if holder:
        plan.refusals.append(HeldByOtherVMError(
            f"{addr} is held by {holder}", hint="stop that VM first, or pass another device"))
    driver = dev.driver
    if driver not in (None, "nvme", VFIO, "pci-stub"):
        # SPDK/DPDK (uio_pci_generic, igb_uio...) and the like: a host user of the
        # controller that no namespace shows.
        plan.refusals.append(InUseError(
            f"{addr} is bound to {driver}, not to nvme: the host uses it through that driver",
            hint=f"stop what uses it and unbind it from {driver}"
                 f" (echo {addr} > /sys/bus/pci/drivers/{driver}/unbind), or pass another"
                 " device"))
    disks = namespaces(dev) if driver else []
    if disks:
        use = host_use(ctx.root, ctx.kernel, disks, openers, ignore)
        if use.in_use:
            plan.refusals.append(InUseError(
                f"{addr}: the host uses this disk: " + "; ".join(use.reasons),
                hint="stop using it on the host (umount, swapoff, vgchange -an, zpool export)"
                     " or pass another disk"))
        for note in use.notes:
            plan.lines.append(f"{addr}: {note}")
    if driver:
        from .multipath import other_paths

        staying = [p for p in other_paths(dev) if p.address not in moving]
        for head in sorted({p.head for p in staying}):
            paths = ", ".join(str(p) for p in staying if p.head == head)
            plan.refusals.append(InUseError(
                f"{addr}: {head} is also reachable through {paths}, which stay(s) with the"
                " host (native NVMe multipath): the host would keep using the namespace the"
                " VM writes",
                hint="pass every path of it to this VM, or detach the namespace from the"
                     " other controllers"))
    if len(plan.refusals) > refused:
        return
    others = sorted(a for a in moving if a != addr and PciDevice(ctx.root, a).iommu_group == group)
    shared = ("isolated" if not others else
              "shared with " + ", ".join(map(str, others)) + ", which go(es) to vfio-pci too")
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
                          f" {shared}, not used by the host")
        plan.steps.append(Step(dev, driver, len(disks), stale[0].vmid if stale else None))


def check(ctx: Context, plan: Plan, ignore: frozenset[str] = frozenset()) -> None:
    """Check every device the start takes from the host; all are checked before anything
    changes. Needs `choose` first. `ignore`: holders pre-start's safety net deactivates
    first (pvehook.autoactivated), left out of the host-use check of `pvehook check`."""
    if not plan.hostpci or plan.refusals:
        return
    if not iommu.iommu_enabled(ctx.root):
        # prepare_pci_device dies for every hostpci entry, driver=keep and mdev included
        plan.refusals.append(IommuError(
            "the IOMMU is off (/sys/class/iommu is empty): qemu-server refuses every hostpci"
            " device (\"cannot prepare PCI pass-through, IOMMU not present\")",
            hint="enable VT-d/AMD-Vi in the firmware and add intel_iommu=on (Intel) to the"
                 " kernel command line, then reboot"))
        return
    from .openers import Openers
    from .pins import check_pins

    check_pins(ctx, plan, plan.managed)  # first: "this is not your drive" comes before the rest
    holds = Holds(ctx.root, ctx.records, plan.vmid)
    plan.lines += holds.notes
    openers = Openers(ctx.root)  # one /proc scan for every device the start takes
    moving = check_groups(ctx, plan, holds, openers)
    for dev in plan.managed:
        check_device(ctx, dev, moving, holds, plan, openers, ignore)


def dry_run(ctx: Context, vmid: int) -> Plan:
    """pre-start's decisions without locks and without changing anything."""
    plan = prepare(ctx, vmid)
    if not plan.refusals and plan.hostpci:
        choose(ctx, plan)
        gone: frozenset[str] = frozenset()
        if plan.managed and not plan.refusals:
            # What pre-start's safety net would deactivate first (pvehook.autoactivated).
            from .autoactivated import release

            try:
                gone = frozenset(release(ctx.root, plan.managed, plan.lines, apply=False))
            except OSError as e:  # lvm or mdadm failing: say so, check without it
                plan.lines.append(f"could not check the guest's storage the host activated: {e}")
        check(ctx, plan, gone)
    return plan
