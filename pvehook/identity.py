"""Which drive sits behind a PCI address: the identity the kernel shows (sysfs).

A `hostpci` line names a slot; a BIOS update or a new card renumbers buses and the same
line names another drive. The drive itself is known by what its controller reports while
the nvme driver has it (drivers/nvme/host/sysfs.c): the controller's `serial`, `model`,
`firmware_rev` and `subsysnqn` under <pci>/nvme/nvmeX, and each namespace's `nguid`,
`eui`, `uuid` and `wwid` on its disk (an attribute the drive leaves zero is not shown).

On vfio-pci (or without a driver) none of that is there. PCIe's Device Serial Number
extended capability (ID 0x0003, an EUI-64 in config space) identifies the device where
it has one; root can read config space beyond the first 64 bytes.

An identity is a plain dict (it goes into the pin store as JSON).
"""

from __future__ import annotations

import os
import re

from .pci import PciDevice

_NS_RE = re.compile(r"^nvme\d+n(\d+)$")

# PCIe extended capabilities (PCIe base spec 7.9.3): a chain of dword headers from 0x100,
# [15:0] capability ID, [19:16] version, [31:20] offset of the next one (0: the end).
EXT_CAP_START = 0x100
EXT_CAP_DSN = 0x0003


def _attr(path) -> str | None:
    try:
        value = path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError, OSError):
        return None
    return value or None


def read_dsn(dev: PciDevice) -> str | None:
    """The PCIe Device Serial Number as lspci prints it (`00-11-22-33-44-55-66-77`), or
    None: no such capability, a zero or all-ones value (no serial), or config space not
    readable beyond 64 bytes (not root)."""
    try:
        with open(dev.sys_path / "config", "rb") as f:
            config = f.read(4096)
    except OSError:
        return None
    offset, seen = EXT_CAP_START, set()
    while EXT_CAP_START <= offset <= len(config) - 12 and offset not in seen:
        seen.add(offset)
        header = int.from_bytes(config[offset:offset + 4], "little")
        if header in (0, 0xFFFFFFFF):
            return None
        if header & 0xFFFF == EXT_CAP_DSN:
            low = int.from_bytes(config[offset + 4:offset + 8], "little")
            high = int.from_bytes(config[offset + 8:offset + 12], "little")
            value = high << 32 | low
            if value in (0, 0xFFFFFFFFFFFFFFFF):
                return None
            return "-".join(f"{b:02x}" for b in value.to_bytes(8, "big"))
        offset = (header >> 20) & 0xFFC
    return None


def _controller_dir(dev: PciDevice):
    base = dev.sys_path / "nvme"
    try:
        ctrls = sorted(os.listdir(base))
    except (FileNotFoundError, NotADirectoryError):
        return None
    return base / ctrls[0] if ctrls else None


def read(dev: PciDevice) -> dict | None:
    """The drive's identity while the nvme driver has it; None when no controller is
    there (another driver, none, or a controller that did not come up)."""
    from .block import namespaces

    ctrl = _controller_dir(dev)
    serial = _attr(ctrl / "serial") if ctrl else None
    if serial is None:
        return None
    ident = {"serial": serial, "model": _attr(ctrl / "model"),
             "firmware": _attr(ctrl / "firmware_rev"), "subsysnqn": _attr(ctrl / "subsysnqn"),
             "id": dev.vendor_device, "dsn": read_dsn(dev), "namespaces": []}
    for disk in namespaces(dev):
        m = _NS_RE.match(disk.name)
        nsid = _attr(disk.sys_path / "nsid") or (m[1] if m else None)
        ns = {"nsid": int(nsid) if nsid and nsid.isdigit() else None}
        for name in ("nguid", "eui", "uuid", "wwid"):
            ns[name] = _attr(disk.sys_path / name)
        ident["namespaces"].append(ns)
    return ident


def describe(ident: dict | None) -> str:
    """`<model> <serial>`: what an admin finds on the drive's label and in `nvme list`."""
    if not ident:
        return "an unknown drive"
    if ident.get("serial"):
        return " ".join(v for v in (ident.get("model"), ident["serial"]) if v)
    if ident.get("dsn"):
        return f"the drive with PCIe Device Serial Number {ident['dsn']}"
    return "an unknown drive"


def same_drive(a: dict, b: dict) -> bool:
    """Two identities read from nvme name the same drive: the same controller serial and
    model (and NQN when both have one). Firmware changes with an update and namespace ids
    with a re-created namespace: neither makes it another drive."""
    if not a.get("serial") or not b.get("serial"):
        return False
    if (a["serial"], a.get("model")) != (b["serial"], b.get("model")):
        return False
    return not (a.get("subsysnqn") and b.get("subsysnqn") and a["subsysnqn"] != b["subsysnqn"])


def changes(pinned: dict, now: dict) -> list[str]:
    """What differs on the same drive since it was pinned (for a note, never a refusal)."""
    out = []
    if pinned.get("firmware") and now.get("firmware") and pinned["firmware"] != now["firmware"]:
        out.append(f"firmware {pinned['firmware']} -> {now['firmware']}")
    old = [{k: v for k, v in ns.items() if k != "wwid"} for ns in pinned.get("namespaces") or []]
    new = [{k: v for k, v in ns.items() if k != "wwid"} for ns in now.get("namespaces") or []]
    if now.get("namespaces") is not None and old and old != new:
        out.append("namespace ids differ (namespaces re-created?)")
    return out
