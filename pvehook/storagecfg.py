"""Reader of /etc/pve/storage.cfg and LVM volumes of a VM's disks (pure).

storage.cfg is a PVE::SectionConfig file: a header line `<type>: <id>`, then indented
`key value` lines up to the next empty line. Like Proxmox, lines it cannot place are
skipped with a warning (collected in `warnings` when given), not fatal: Proxmox starts
VMs despite them, so the hook must not refuse because of them.
"""

from __future__ import annotations

import re
from collections import namedtuple
from collections.abc import Callable

from .errors import ConfigError
from .paths import Root
from .vmconfig import Disk

_KV_RE = re.compile(r"^\s+(\S+)(\s+(.*\S))?\s*$")
_STORAGE_HEADER_RE = re.compile(r"^(\S+):\s*(\S+)\s*$")
# Perl's /i: ASCII only (Python would also fold the Kelvin sign and the long s to k, s)
_STORAGE_ID_RE = re.compile(r"^[a-z][a-z0-9\-_.]*[a-z0-9]$", re.IGNORECASE | re.ASCII)
# PVE::Storage::Plugin::parse_lvm_name
_LVM_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9\-_.]*[a-z0-9]$", re.IGNORECASE | re.ASCII)

LVM_TYPES = ("lvm", "lvmthin")
# Storage types whose volumes are files under a path, and which may hold snippets
# (pve-storage: Dir, NFS, CIFS, CephFS, BTRFS plugins; GlusterFS until PVE 8).
DIR_TYPES = ("dir", "nfs", "cifs", "cephfs", "btrfs", "glusterfs")
SHARED_TYPES = ("nfs", "cifs", "cephfs", "glusterfs")


class Section(namedtuple("Section", "lineno type id items")):
    """`items`: (line number, key, value) tuples; "1" is the value of a bare key."""

    __slots__ = ()


def parse_sections(
    text: str,
    parse_header: Callable[[str], tuple[str | None, str] | None],
    *,
    source: str,
    warnings: list[str] | None = None,
) -> list[Section]:
    """PVE::SectionConfig::parse_config's line structure.

    Comment lines (`\\s*#`) are dropped everywhere; a section runs from its header to
    the next empty line (a header right after a section without an empty line between
    is ignored, and its keys land in the section before, as in Proxmox).
    """
    warn = warnings.append if warnings is not None else (lambda _msg: None)
    lines = [
        (n, line) for n, line in enumerate(text.split("\n"), 1) if not re.match(r"^\s*#", line)
    ]
    sections: list[Section] = []
    i = 0
    while i < len(lines):
        lineno, line = lines[i]
        i += 1
        if not line:
            continue
        header = parse_header(line)
        if header is None:
            warn(f"{source} line {lineno}: ignored line {line!r}")
            continue
        type_, sid = header
        items: list[tuple[int, str, str]] = []
        while i < len(lines) and lines[i][1]:
            n, kv = lines[i]
            i += 1
            m = _KV_RE.match(kv)
            if m:
                items.append((n, m[1], m[3] if m[3] is not None else "1"))
            else:
                warn(f"{source} line {n} (section {sid!r}): ignored line {kv!r}")
        sections.append(Section(lineno, type_, sid, tuple(items)))
    return sections


def serves_node(disabled: bool, nodes, node: str) -> bool:
    """Proxmox's rule (PVE::Storage storage_check_enabled, storage_check_node): a storage
    serves a node unless it is disabled or its `nodes` list (None: every node) leaves the
    node out."""
    return not disabled and (not nodes or node in nodes)


class Storage(namedtuple("Storage", "id type options")):
    __slots__ = ()

    def on_node(self, node: str) -> bool:
        nodes = [n for n in (self.options.get("nodes") or "").split(",") if n]
        return serves_node(self.options.get("disable", "0") not in ("0", ""), nodes, node)

    @property
    def vgname(self) -> str | None:
        return self.options.get("vgname")

    @property
    def thinpool(self) -> str | None:
        return self.options.get("thinpool")


def _storage_header(line: str) -> tuple[str | None, str] | None:
    m = _STORAGE_HEADER_RE.match(line)
    return (m[1].lower(), m[2]) if m else None


def parse_storage_cfg(
    text: str, *, source: str = "storage.cfg", warnings: list[str] | None = None
) -> dict[str, Storage]:
    warn = warnings.append if warnings is not None else (lambda _msg: None)
    res: dict[str, Storage] = {}
    for sec in parse_sections(text, _storage_header, source=source, warnings=warnings):
        if not _STORAGE_ID_RE.match(sec.id):
            warn(f"{source} line {sec.lineno}: skipped section with invalid storage id {sec.id!r}")
            continue
        opts: dict[str, str] = {}
        for n, key, value in sec.items:
            if key in opts:
                warn(f"{source} line {n} (section {sec.id!r}): duplicate {key!r} ignored")
                continue
            opts[key] = value
        res[sec.id] = Storage(sec.id, sec.type or "", opts)
    # PVE::Storage::Plugin::parse_config: 'local' is always a dir storage on /var/lib/vz.
    local = res.get("local")
    if local is None or local.type != "dir" or local.options.get("path", "/var/lib/vz") != "/var/lib/vz":
        res["local"] = Storage("local", "dir", {"path": "/var/lib/vz"})
    elif "path" not in local.options:
        res["local"] = Storage("local", "dir", {**local.options, "path": "/var/lib/vz"})
    return res


def load_storage_cfg(root: Root, *, warnings: list[str] | None = None) -> dict[str, Storage]:
    path = root.pve("storage.cfg")
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        text = ""  # Proxmox then knows only 'local'
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    return parse_storage_cfg(text, source=str(path), warnings=warnings)


class LvmVolume(namedtuple("LvmVolume", "storage vg lv thinpool format", defaults=("raw",))):
    """`thinpool` is set for lvmthin; `format` is 'qcow2' for LVM (thick) volumes named
    *.qcow2 (PVE 9 snapshot chains)."""

    __slots__ = ()

    @property
    def dev_path(self) -> str:
        return f"/dev/{self.vg}/{self.lv}"


def lvm_volume(storages: dict[str, Storage], disk: Disk) -> LvmVolume | None:
    """The LV behind a disk on an lvm/lvmthin storage; None for any other disk.

    Mirrors LVMPlugin/LvmThinPlugin parse_volname and filesystem_path: the LV is the
    volume name, in the storage's `vgname`.
    """
    sid, volname = disk.storage, disk.volname
    if sid is None or volname is None:
        return None
    storage = storages.get(sid)
    if storage is None:
        raise ConfigError(f"{disk.key}: storage {sid!r} of {disk.volume!r} is not in storage.cfg")
    if storage.type not in LVM_TYPES:
        return None
    vg = storage.vgname
    if not vg:
        raise ConfigError(f"storage {sid!r} ({storage.type}) has no vgname")
    name_re = r"^(vm-\d+-\S+)$" if storage.type == "lvm" else r"^((?:vm|base)-\d+-\S+)$"
    if not _LVM_NAME_RE.match(volname) or not re.match(name_re, volname):
        raise ConfigError(
            f"{disk.key}: cannot parse {storage.type} volume name {volname!r} of {disk.volume!r}"
        )
    if storage.type == "lvmthin":
        return LvmVolume(sid, vg, volname, storage.thinpool or None, "raw")
    fmt = "qcow2" if volname.endswith(".qcow2") else "raw"
    return LvmVolume(sid, vg, volname, None, fmt)
