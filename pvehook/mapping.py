"""Reader of /etc/pve/mapping/pci.cfg, the cluster-wide PCI mappings (pure).

PVE::Mapping::PCI (pve-guest-common) is a SectionConfig whose header is the bare id
(type always 'pci'), e.g.::

    someNic
    \tdescription NIC ports
    \tmap node=pve1,path=0000:07:10.0,id=8086:1520,iommugroup=2
    \tmap node=pve1,path=0000:07:10.1,id=8086:1520,iommugroup=2

Each `map` line is one alternative. Its `path` may join several ids with `;`; qemu-server
passes all of them as one multifunction device. An id without function (`0000:07:10`)
means the whole slot. Like Proxmox (get_node_mapping warns and skips), a `map` line that
does not parse is left out, and sections without valid id or without `map` are dropped.
"""

from __future__ import annotations

import re
from collections import namedtuple

from .errors import ConfigError
from .paths import Root
from .pci import PciSelector
from .storagecfg import parse_sections
from .vmconfig import parse_property_string

_HEADER_RE = re.compile(r"^(\S+)\s*$")
_CONFIGID_RE = re.compile(r"^[a-z][a-z0-9_-]+$", re.IGNORECASE | re.ASCII)
# PVE::Mapping::PCI: $PCI_RE (domain required, lower-case hex, function optional)
_PATH_ID_RE = re.compile(r"^[a-f0-9]{4,}:[a-f0-9]{2}:[a-f0-9]{2}(?:\.[a-f0-9])?$")
_VENDOR_DEVICE_RE = re.compile(r"^[0-9A-Fa-f]{4}:[0-9A-Fa-f]{4}$")
_MAP_KEYS = {"node", "path", "id", "subsystem-id", "iommugroup", "description"}


class MapEntry(namedtuple("MapEntry", "node paths id iommugroup options")):
    """One `map` line: `paths` (PciSelectors) are one multifunction device, a path may
    omit the function; `id` the vendor:device expected there or None; `iommugroup` an int
    or None; `options` every key=value of the line."""

    __slots__ = ()

    @classmethod
    def parse(cls, text: str, *, where: str = "") -> "MapEntry":
        opts = parse_property_string(text, None, where=where)
        unknown = sorted(set(opts) - _MAP_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} in {text!r}")
        for required in ("node", "path", "id"):
            if required not in opts:
                raise ConfigError(f"{where}: missing {required}= in {text!r}")
        ids = opts["path"].split(";")
        for pci_id in ids:
            if not _PATH_ID_RE.match(pci_id):
                raise ConfigError(f"{where}: invalid path {pci_id!r} in {text!r}")
        try:
            paths = tuple(PciSelector.parse(p) for p in ids)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        for key in ("id", "subsystem-id"):
            if key in opts and not _VENDOR_DEVICE_RE.match(opts[key]):
                raise ConfigError(f"{where}: invalid {key} {opts[key]!r}")
        group = opts.get("iommugroup")
        if group is not None and not re.fullmatch(r"[+-]?\d+", group):
            raise ConfigError(f"{where}: iommugroup is not an integer: {group!r}")
        return cls(opts["node"], paths, opts["id"], int(group) if group is not None else None, opts)


class PciMapping(namedtuple("PciMapping", "id entries options")):
    """`entries`: the valid map lines of every node, in file order; `options`:
    description, mdev, live-migration-capable..."""

    __slots__ = ()

    def for_node(self, node: str) -> tuple[MapEntry, ...]:
        return tuple(e for e in self.entries if e.node == node)

    @property
    def mdev(self) -> bool:
        return self.options.get("mdev", "0") not in ("0", "")


def _header(line: str) -> tuple[str | None, str] | None:
    m = _HEADER_RE.match(line)
    return ("pci", m[1]) if m else None


def parse_pci_mappings(
    text: str, *, source: str = "mapping/pci.cfg", warnings: list[str] | None = None
) -> dict[str, PciMapping]:
    warn = warnings.append if warnings is not None else (lambda _msg: None)
    res: dict[str, PciMapping] = {}
    for sec in parse_sections(text, _header, source=source, warnings=warnings):
        if not _CONFIGID_RE.match(sec.id):
            warn(f"{source} line {sec.lineno}: skipped section with invalid id {sec.id!r}")
            continue
        entries: list[MapEntry] = []
        options: dict[str, str] = {}
        has_map = False
        for n, key, value in sec.items:
            where = f"{source} line {n} (mapping {sec.id!r})"
            if key == "map":
                has_map = True
                try:
                    entries.append(MapEntry.parse(value, where=where))
                except ConfigError as e:
                    warn(f"{e} (entry ignored)")
            elif key in options:
                warn(f"{where}: duplicate {key!r} ignored")
            else:
                options[key] = value
        if not has_map:
            warn(f"{source} line {sec.lineno}: skipped mapping {sec.id!r} without map lines")
            continue
        res[sec.id] = PciMapping(sec.id, tuple(entries), options)
    return res


def load_pci_mappings(root: Root, *, warnings: list[str] | None = None) -> dict[str, PciMapping]:
    path = root.pve("mapping", "pci.cfg")
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    return parse_pci_mappings(text, source=str(path), warnings=warnings)
