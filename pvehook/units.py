"""Sizes as Proxmox writes them (`size=32G`) and as pvehook prints them (`32 GiB`)."""

from __future__ import annotations

import re

# PVE::JSONSchema::parse_size (pve-common): binary units, no suffix = bytes.
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT](?:iB)?)?$")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: str) -> int | None:
    """Bytes of a Proxmox `size=` value (`32G`, `528K`, `4MiB`, `1.5T`, `1024`)."""
    m = _SIZE_RE.match(value)
    if not m:
        return None
    from decimal import Decimal  # exact "1.5T"; only for VMs with a size= on LVM

    unit = (m[2] or "")[:1]
    return int(Decimal(m[1]) * _UNITS.get(unit, 1))


def human_size(n: int) -> str:
    """`32 GiB`, `4 MiB`, `31.5 GiB`, `512 B`."""
    for unit, mult in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult:
            v = n / mult
            return f"{v:.0f} {unit}" if n % mult == 0 else f"{v:.1f} {unit}"
    return f"{n} B"
