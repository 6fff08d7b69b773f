"""Which PCI functions a VM's hostpci entries mean on this node (pure).

Mirrors qemu-server's PVE::QemuServer::PCI parse_hostpci + choose_hostpci_devices:

- host=: every `;`-joined id is looked up like SysFSTools::lspci, a prefix match, so an
  id without function means every existing function of that slot (sorted); an id
  without domain means domain 0000. An id that matches nothing is an error.
- mapping=: the mapping's `map` lines for this node are alternatives; each alternative
  must exist (qemu-server checks all of them before choosing). With one alternative,
  that is taken as is (a conflict shows later, when it is reserved); with several, the
  first none of whose functions is taken is chosen.
- mdev entries: resolved the same way, but they do not mark their functions as chosen
  for later entries of the VM (qemu-server shares an mdev parent between mdevs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .errors import ConfigError, DeviceNotFoundError
from .pci import PciAddress, PciSelector
from .vmconfig import HostPci, VmConfig

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:  # the mapping parser is imported only for VMs that use mapping=
    from .mapping import PciMapping


def expand_selector(selector: PciSelector, existing: Sequence[PciAddress]) -> tuple[PciAddress, ...]:
    return tuple(sorted(a for a in existing if selector.matches(a)))


def _expand_all(
    entry: HostPci, selectors: Sequence[PciSelector], existing: Sequence[PciAddress], what: str
) -> tuple[PciAddress, ...]:
    found: list[PciAddress] = []
    for sel in selectors:
        addrs = expand_selector(sel, existing)
        if not addrs:
            raise DeviceNotFoundError(f"{entry.key}: no PCI device found for '{sel}'{what}")
        found.extend(addrs)
    return tuple(found)


def alternatives(
    entry: HostPci, existing: Sequence[PciAddress], mappings: dict[str, PciMapping], node: str
) -> list[tuple[PciAddress, ...]]:
    """Every candidate device (tuple of functions) of an entry, in qemu-server's order."""
    if entry.mapping is None:
        return [_expand_all(entry, entry.selectors, existing, "")]
    mapping = mappings.get(entry.mapping)
    if mapping is None:
        raise DeviceNotFoundError(
            f"{entry.key}: PCI device mapping not found for '{entry.mapping}'",
            hint="no such id in /etc/pve/mapping/pci.cfg",
        )
    map_entries = mapping.for_node(node)
    if not map_entries:
        raise DeviceNotFoundError(
            f"{entry.key}: PCI device mapping not found for '{entry.mapping}' on node '{node}'",
            hint=f"mapping '{entry.mapping}' has no map entry for node '{node}'",
        )
    return [
        _expand_all(entry, e.paths, existing, f" (mapping '{entry.mapping}')") for e in map_entries
    ]


def resolve_hostpci(
    entry: HostPci,
    existing: Sequence[PciAddress],
    mappings: dict[str, PciMapping],
    node: str,
    taken: Callable[[PciAddress], bool],
) -> tuple[PciAddress, ...]:
    alts = alternatives(entry, existing, mappings, node)
    if entry.mdev is not None and any(len(a) > 1 for a in alts):
        raise ConfigError(f"{entry.key}: cannot use mediated device with multifunction device")
    if len(alts) == 1:
        return alts[0]
    for alt in alts:
        if not any(taken(a) for a in alt):
            return alt
    raise DeviceNotFoundError(
        f"{entry.key}: could not find a free device for mapping '{entry.mapping}'",
        hint="all of its devices on this node are in use: "
        + ", ".join(";".join(str(a) for a in alt) for alt in alts),
    )


def resolve_vm(
    config: VmConfig,
    existing: Sequence[PciAddress],
    mappings: dict[str, PciMapping],
    node: str,
    held_by_others: Callable[[PciAddress], bool],
) -> list[tuple[HostPci, tuple[PciAddress, ...]]]:
    """Resolve every hostpci entry of a VM in index order.

    Functions chosen by an earlier (non-mdev) entry count as taken for later ones; a
    function assigned twice is a ConfigError, as in qemu-server. Templates start without
    hostpci devices, so they resolve to nothing.
    """
    if config.is_template:
        return []
    chosen: dict[PciAddress, str] = {}

    def taken(addr: PciAddress) -> bool:
        return addr in chosen or held_by_others(addr)

    result: list[tuple[HostPci, tuple[PciAddress, ...]]] = []
    for entry in config.hostpci:
        addrs = resolve_hostpci(entry, existing, mappings, node, taken)
        if entry.mdev is None:
            for addr in addrs:
                if addr in chosen:
                    other = chosen[addr]
                    both = entry.key if other == entry.key else f"{other} and {entry.key}"
                    raise ConfigError(
                        f"{config.source}: PCI device {addr} assigned more than once ({both})"
                    )
                chosen[addr] = entry.key
        result.append((entry, addrs))
    return result
