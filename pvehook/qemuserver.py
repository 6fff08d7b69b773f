"""What qemu-server 9.2 refuses after pre-start, so the hook refuses it before binding.

A start that fails after pre-start runs no post-stop (vm_start's error path only cleans up
qemu-server's own reservations), so a device the hook bound would stay on vfio-pci. The
rules and messages are qemu-server's:

- PVE::QemuServer::PCI parse_hostpci_devices: `pcie=1` needs a q35 machine ("q35 machine
  model is not enabled"), and the legacy-igd rules;
- PVE::Mapping::PCI assert_valid (pve-guest-common), run by parse_hostpci for every `map`
  line of this node: the device at `path` must still be the one the mapping describes
  (`id`, `iommugroup` of the first path, `subsystem-id`, `mdev`);
- PVE::QemuServer::Machine machine_type_is_q35: the `machine` option's type contains q35.
"""

from __future__ import annotations

import os
import re

from .errors import ConfigError, DeviceNotFoundError
from .paths import Root
from .pci import PciAddress
from .vmconfig import HostPci, VmConfig, parse_property_string

# PVE::QemuServer::Machine $machine_fmt: its keys and the pattern of `type`.
_MACHINE_KEYS = {"type", "viommu", "aw-bits", "enable-s3", "enable-s4"}
_MACHINE_TYPE_RE = re.compile(
    r"^(pc|pc(-i440fx)?-\d+(\.\d+)+(\+pve\d+)?(\.pxe)?|q35|pc-q35-\d+(\.\d+)+(\+pve\d+)?(\.pxe)?"
    r"|virt(?:-\d+(\.\d+)+)?(\+pve\d+)?)$")


def machine_is_q35(config: VmConfig) -> bool:
    """machine_type_is_q35: no `machine` means i440fx ('pc'); a value qemu-server cannot
    parse is dropped by parse_vm_config, so it does not make the VM q35 either."""
    value = config.options.get("machine")
    if not value:
        return False
    try:
        opts = parse_property_string(value, "type")
    except ConfigError:
        return False
    kind = opts.get("type")
    if set(opts) - _MACHINE_KEYS or not kind or not _MACHINE_TYPE_RE.match(kind):
        return False
    return "q35" in kind


def hostpci_errors(config: VmConfig) -> list[ConfigError]:
    """parse_hostpci_devices' checks that need no hardware, in its order."""
    errors: list[ConfigError] = []
    q35 = machine_is_q35(config)
    legacy_igd = False
    for entry in config.hostpci:
        def refuse(msg: str, hint: str) -> None:
            errors.append(ConfigError(
                f"{entry.key}: qemu-server refuses to start the VM: \"{msg}\"", hint=hint))

        if entry.flag("pcie") and not q35:
            refuse("q35 machine model is not enabled",
                   f"pcie=1 needs the q35 machine type: `qm set {config.vmid} --machine q35`,"
                   f" or remove pcie=1 from {entry.key}")
        if not entry.flag("legacy-igd"):
            continue
        hint = "see the legacy-igd notes in the Proxmox VE admin guide (PCI passthrough)"
        if legacy_igd:
            refuse("only one device can be assigned in legacy-igd mode", hint)
        legacy_igd = True
        if config.options.get("vga") != "none":
            refuse("legacy IGD assignment requires VGA mode to be 'none'", hint)
        if "rombar" in entry.options and not entry.flag("rombar"):
            refuse("legacy IGD assignment requires rombar to be enabled", hint)
        if entry.flag("x-vga"):
            refuse("legacy IGD assignment is not compatible with x-vga", hint)
        if entry.mdev is not None:
            refuse("legacy IGD assignment is not compatible with mdev", hint)
        if q35:
            refuse("legacy IGD assignment is not compatible with q35", hint)
    return errors


def legacy_igd_errors(entry: HostPci, alternatives: list[tuple[PciAddress, ...]]) -> list[ConfigError]:
    """The legacy-igd rules that need the entry's functions."""
    if not entry.flag("legacy-igd"):
        return []
    msgs = []
    if any(len(alt) > 1 for alt in alternatives):
        msgs.append("legacy IGD assignment is not compatible with multifunction devices")
    if len(alternatives) > 1:
        msgs.append("legacy IGD assignment is not compatible with alternate devices")
    if alternatives and alternatives[0] and not str(alternatives[0][0]).endswith("02.0"):
        msgs.append("legacy IGD assignment only works for devices on host bus 00:02.0")
    return [ConfigError(f"{entry.key}: qemu-server refuses to start the VM: \"{m}\"",
                        hint="see the legacy-igd notes in the Proxmox VE admin guide")
            for m in msgs]


def _first_line(path) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return None


def mapping_error(root: Root, entry: HostPci, mapping, map_entry) -> DeviceNotFoundError | None:
    """PVE::Mapping::PCI::assert_valid for one `map` line of this node, as parse_hostpci
    runs it: the first mismatch, with qemu-server's message, or None.

    Values are compared as strings with every "0x" removed, as Perl's `ne` does (so an
    upper-case id does not match the kernel's lower-case one). A mismatch means the
    hardware at that path is not what the mapping was made for: exit code 3, like a
    mapping that names no device.
    """
    def refuse(msg: str) -> DeviceNotFoundError:
        return DeviceNotFoundError(
            f"{entry.key}: qemu-server refuses to start the VM: \"PCI device mapping invalid"
            f" (hardware probably changed): {msg}\"",
            hint=f"check the device at that path, then correct mapping '{mapping.id}'"
                 " (Datacenter > Resource Mappings) or the hardware")

    configured = {k: map_entry.options.get(k) for k in ("id", "iommugroup", "subsystem-id")}
    configured["mdev"] = "1" if mapping.mdev else "0"
    for idx, sel in enumerate(map_entry.paths):
        path = str(sel) if sel.function is not None else f"{sel}.0"  # whole device: .0
        devdir = root.sys("bus", "pci", "devices", path)
        vendor, device = _first_line(devdir / "vendor"), _first_line(devdir / "device")
        if not vendor or not device:
            return refuse(f"pci device '{path}' not found")
        expected: dict[str, str | None] = {"id": f"{vendor}:{device}", "subsystem-id": None}
        sub_v, sub_d = _first_line(devdir / "subsystem_vendor"), _first_line(devdir / "subsystem_device")
        if sub_v is not None and sub_d is not None:
            expected["subsystem-id"] = f"{sub_v}:{sub_d}"
        try:
            expected["iommugroup"] = os.path.basename(os.readlink(devdir / "iommu_group"))
        except OSError:
            expected["iommugroup"] = None
        has_mdev = (devdir / "mdev_supported_types").is_dir() or (devdir / "nvidia").is_dir()
        expected["mdev"] = "1" if has_mdev else "0"
        for prop in sorted(expected):
            if prop == "iommugroup" and idx > 0:  # qemu-server checks it on the first only
                continue
            want, have = expected[prop], configured[prop]
            if want is None and have is None:
                continue
            if have is None:
                return refuse(f"missing expected property '{prop}' for device '{path}'")
            if want is None:
                return refuse(f"unexpected property '{prop}' configured for device '{path}'")
            want, have = want.replace("0x", ""), have.replace("0x", "")
            if want != have:
                return refuse(f"'{prop}' does not match for '{mapping.id}' ({want} != {have})")
    return None


def has_secondary_bus(root: Root, address: PciAddress) -> bool:
    """A bridge with a bus behind it has a pci_bus directory; pve-common's SysFSTools
    pci_dev_group_bind_to_vfio skips exactly those members of a group and binds all the
    others to vfio-pci: an ISA/LPC bridge (class 0x0601) has none and is bound too."""
    return root.sys("bus", "pci", "devices", str(address), "pci_bus").is_dir()
