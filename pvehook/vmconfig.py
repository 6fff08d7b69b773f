"""Reader of a VM's config, /etc/pve/qemu-server/<vmid>.conf (pure, no side effects).

Mirrors qemu-server's parse_vm_config (src/PVE/QemuServer.pm) for the main section only,
which is the configuration a start uses:

- `key: value` lines, key `[a-z][a-z_-]*\\d*`; blank lines are skipped; a later
  duplicate key wins; `cdrom:` is an old name of `ide2:`.
- `#...` lines (and `description:`) are the percent-encoded description.
- The first `[...]` line ends the main section: `[PENDING]`, `[special:cloudinit]`,
  `[special:fleecing]`, snapshot `[name]` and unknown sections alike.
- Property strings follow PVE::JSONSchema::parse_property_string: split at `,`,
  `key=value` (value may contain `=`), one bare value for the default key.
"""

from __future__ import annotations

import re
from collections import namedtuple

from .errors import ConfigError
from .paths import Root
from .pci import PciSelector

MAX_HOSTPCI = 16  # PVE::QemuServer::PCI::$MAX_HOSTPCI_DEVICES

# PVE::QemuServer::Drive::valid_drive_names(); the order qemu-server iterates disks in.
DISK_KEYS: tuple[str, ...] = (
    *(f"ide{i}" for i in range(4)),
    *(f"scsi{i}" for i in range(31)),
    *(f"virtio{i}" for i in range(16)),
    *(f"sata{i}" for i in range(6)),
    "efidisk0",
    "tpmstate0",
)
_DISK_ORDER = {key: i for i, key in enumerate(DISK_KEYS)}

_SECTION_RE = re.compile(r"^\[([^\]]*)\]\s*$")
_DESCR_RE = re.compile(r"^description:\s*(.*\S)\s*$")
_KEY_RE = re.compile(r"^([a-z][a-z_\-]*\d*):\s*(.+?)\s*$")
_DELETE_RE = re.compile(r"^delete:\s*(.*\S)\s*$")
_HOSTPCI_KEY_RE = re.compile(r"^hostpci(\d+)$")
# PVE::QemuServer::PCI: my $PCIRE (lower-case hex; domain optional)
_PCI_ID_RE = re.compile(r"^(?:[a-f0-9]{4,}:)?[a-f0-9]{2}:[a-f0-9]{2}(?:\.[a-f0-9])?$")
# PVE::Storage::Plugin::parse_volume_id (Perl's /i: ASCII only, no Kelvin sign for k)
_VOLID_RE = re.compile(r"^([a-z][a-z0-9\-_.]*[a-z0-9]):(.+)$",
                       re.IGNORECASE | re.ASCII | re.DOTALL)
# PVE::QemuServer::Drive::drive_is_cloudinit
_CLOUDINIT_RE = re.compile(r"[:/](?:vm-\d+-)?cloudinit(?:\.(?:raw|qcow2|vmdk))?$")

# Key aliases of the drive formats (Drive.pm: volume => { alias => 'file' }).
_DISK_ALIASES = {"volume": "file"}


def parse_property_string(
    text: str,
    default_key: str | None = None,
    *,
    where: str = "",
    aliases: dict[str, str] | None = None,
) -> dict[str, str]:
    """Split a Proxmox property string into a dict of raw string values.

    `where` prefixes error messages (e.g. "qemu-server/100.conf line 7: hostpci0").
    """
    prefix = f"{where}: " if where else ""
    res: dict[str, str] = {}
    seen_default = False
    for part in text.split(","):
        if not part.strip():
            continue
        m = re.fullmatch(r"([^=]+)=(.+)", part, re.DOTALL)
        if m:
            key, value = m[1], m[2]
            if aliases and key in aliases:
                key = aliases[key]
            if key in res:
                raise ConfigError(f"{prefix}duplicate key {key!r} in {text!r}")
            res[key] = value
        elif "=" not in part:
            if default_key is None:
                raise ConfigError(f"{prefix}value {part!r} without key in {text!r}")
            if seen_default or default_key in res:
                raise ConfigError(f"{prefix}duplicate key {default_key!r} in {text!r}")
            seen_default = True
            res[default_key] = part
        else:
            raise ConfigError(f"{prefix}missing key or value in {part!r} of {text!r}")
    return res


def _unquote(text: str) -> str:
    """Undo the percent-encoding of a description line (PVE::Tools::decode_text)."""
    from urllib.parse import unquote  # ~2 ms to import: only for configs with a description

    return unquote(text, errors="replace")


# PVE::QemuServer::PCI $hostpci_fmt: every key qemu-server knows, and how it checks each
# value (PVE::JSONSchema check_prop: booleans after parse_boolean, patterns anchored).
# host, mapping and driver are checked in HostPci.parse with their own messages.
_BOOL_RE = re.compile(r"^(?:1|on|yes|true|0|off|no|false)$", re.IGNORECASE)
_HEX_ID_RE = re.compile(r"^0x[0-9a-fA-F]{4}$")
_HOSTPCI_VALUES = {  # key -> the pattern its value must match, or None
    "host": None, "mapping": None, "driver": None,
    "rombar": _BOOL_RE, "pcie": _BOOL_RE, "x-vga": _BOOL_RE, "legacy-igd": _BOOL_RE,
    "romfile": re.compile(r"^[^,;]+$"),
    "mdev": re.compile(r"^[^/.:]+$"),
    "vendor-id": _HEX_ID_RE, "device-id": _HEX_ID_RE,
    "sub-vendor-id": _HEX_ID_RE, "sub-device-id": _HEX_ID_RE,
}
# What qemu-server does with a hostpci value its schema rejects: parse_vm_config warns
# "vm <vmid> - unable to parse value of 'hostpciN' - ..." and drops the entry, so the VM
# would start without that device. pvehook refuses instead (see HostPci.parse).
_DROPPED = "qemu-server ignores this entry and would start the VM without the device"


def parse_bool(value: str) -> bool:
    """PVE::JSONSchema::parse_boolean for a value the schema accepted."""
    return value.lower() in ("1", "on", "yes", "true")


class HostPci(namedtuple("HostPci", "key selectors mapping driver options")):
    """`key` "hostpci0"; `selectors` the host= ids (";"-joined), empty with mapping=;
    `driver` "vfio", "keep" or None (qemu-server's default, vfio); `options` every
    key=value, host and mapping included."""

    __slots__ = ()

    @property
    def index(self) -> int:
        return int(self.key[len("hostpci"):])

    @property
    def host(self) -> str | None:
        """The host= value as written (for messages)."""
        return self.options.get("host")

    @property
    def mdev(self) -> str | None:
        return self.options.get("mdev")

    @property
    def keeps_driver(self) -> bool:
        return self.driver == "keep"

    def flag(self, key: str) -> bool:
        """A boolean option (pcie, x-vga, legacy-igd, rombar) as qemu-server reads it."""
        value = self.options.get(key)
        return value is not None and parse_bool(value)

    @property
    def binds_group(self) -> bool:
        """qemu-server binds this entry's IOMMU groups to vfio-pci (PCI.pm
        prepare_pci_device): every entry but driver=keep and mediated devices."""
        return not self.keeps_driver and self.mdev is None

    @classmethod
    def parse(cls, key: str, value: str, *, where: str = "") -> "HostPci":
        where = where or key
        opts = parse_property_string(value, "host", where=where)
        for k, v in opts.items():
            if k not in _HOSTPCI_VALUES:
                raise ConfigError(
                    f"{where}: invalid key in comma-separated list property: {k} ({_DROPPED})",
                    hint="remove or correct the key")
            check = _HOSTPCI_VALUES[k]
            if check is not None and not check.match(v):
                why = (f"type check ('boolean') failed - got '{v}'" if check is _BOOL_RE
                       else f"value does not match the regex pattern ('{v}')")
                raise ConfigError(f"{where}: format error: {k}: {why} ({_DROPPED})",
                                  hint="correct the value")
        host = opts.get("host")
        mapping = opts.get("mapping")
        if host is not None and mapping is not None:
            raise ConfigError(f"{where}: cannot set both 'host' and 'mapping' in {value!r}")
        if host is None and mapping is None:
            raise ConfigError(f"{where}: either 'host' or 'mapping' must be set in {value!r}")
        selectors: tuple[PciSelector, ...] = ()
        if host is not None:
            ids = host.split(";")
            for pci_id in ids:
                if not _PCI_ID_RE.match(pci_id):
                    raise ConfigError(
                        f"{where}: not a PCI id: {pci_id!r} in {value!r}"
                        " (expected [domain:]bus:dev[.fn], lower-case hex)"
                    )
            try:
                selectors = tuple(PciSelector.parse(pci_id) for pci_id in ids)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        if mapping is not None and not re.fullmatch(r"[a-z][a-z0-9_-]+", mapping, re.I | re.A):
            raise ConfigError(f"{where}: invalid mapping id {mapping!r}")
        driver = opts.get("driver")
        if driver is not None and driver not in ("vfio", "keep"):
            raise ConfigError(f"{where}: driver must be 'vfio' or 'keep', got {driver!r}")
        return cls(key, selectors, mapping, driver, opts)


class Disk(namedtuple("Disk", "key volume options")):
    """`key` "scsi0", "virtio1", "efidisk0", "tpmstate0"...; `volume`
    "local-lvm:vm-100-disk-0", "/dev/disk/by-id/...", "none", "cdrom"; `options`
    everything but the volume."""

    __slots__ = ()

    @property
    def storage(self) -> str | None:
        m = self._volid()
        return m[1] if m else None

    @property
    def volname(self) -> str | None:
        m = self._volid()
        return m[2] if m else None

    def _volid(self) -> re.Match[str] | None:
        if self.volume in ("none", "cdrom") or self.volume.startswith("/"):
            return None
        return _VOLID_RE.match(self.volume)

    @property
    def is_cdrom(self) -> bool:
        return self.options.get("media") == "cdrom" or self.volume in ("none", "cdrom")

    @property
    def is_cloudinit(self) -> bool:
        return bool(_CLOUDINIT_RE.search(self.volume))

    @property
    def is_path(self) -> bool:
        """A file or device given by absolute path (no storage involved)."""
        return self.volume.startswith("/")

    @property
    def is_device_path(self) -> bool:
        """A host block device given directly (`/dev/...`)."""
        return self.volume.startswith("/dev/")

    @classmethod
    def parse(cls, key: str, value: str, *, where: str = "") -> "Disk":
        where = where or key
        opts = parse_property_string(value, "file", where=where, aliases=_DISK_ALIASES)
        volume = opts.pop("file", None)
        if volume is None:
            raise ConfigError(f"{where}: no volume in {value!r}")
        # No rewriting of the volume: QemuServer.pm's filename_to_volume_id (bare names to
        # 'local:<vmid>/...') is dead code in parse_vm_config since the drive schemas'
        # formats became hashes, and absolute paths such as /mnt/file.raw are used as is.
        return cls(key, volume, opts)


class VmConfig(namedtuple("VmConfig", "vmid hostpci disks hookscript options source",
                            defaults=("",))):
    """`hostpci`: hostpci0..15 in index order; `disks`: in valid_drive_names() order,
    unusedN excluded; `options`: the whole main section (description included)."""

    __slots__ = ()

    @property
    def description(self) -> str | None:
        return self.options.get("description")

    @property
    def is_template(self) -> bool:
        # qemu-server starts a template (for backup) without its hostpci devices.
        return self.options.get("template", "0") not in ("0", "")

    def disk(self, key: str) -> Disk | None:
        return next((d for d in self.disks if d.key == key), None)

    @classmethod
    def from_text(cls, vmid: int, text: str, source: str | None = None) -> "VmConfig":
        source = source or f"qemu-server/{vmid}.conf"
        options: dict[str, str] = {}
        lines_of: dict[str, int] = {}
        descr: str | None = None
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            if _SECTION_RE.match(line):
                break  # [PENDING], [special:...], snapshots, unknown: not the main section
            if line.startswith("#"):
                descr = (descr or "") + _unquote(line[1:]) + "\n"
                continue
            m = _DESCR_RE.match(line)
            if m:
                descr = (descr or "") + _unquote(m[1])
                continue
            if _DELETE_RE.match(line):
                continue  # only meaningful in [PENDING]; qemu-server ignores it here
            m = _KEY_RE.match(line)
            if not m:
                raise ConfigError(f"{source} line {lineno}: cannot parse {line!r}")
            key, value = m[1], m[2]
            if key == "cdrom":
                key = "ide2"
            options[key] = value
            lines_of[key] = lineno
        if descr is not None:
            options["description"] = descr.rstrip()

        def where(key: str) -> str:
            return f"{source} line {lines_of[key]}: {key}"

        hostpci = []
        for key in options:
            m = _HOSTPCI_KEY_RE.match(key)
            if m and int(m[1]) < MAX_HOSTPCI:
                hostpci.append(HostPci.parse(key, options[key], where=where(key)))
        hostpci.sort(key=lambda h: h.index)

        disks = [
            Disk.parse(key, options[key], where=where(key))
            for key in options
            if key in _DISK_ORDER
        ]
        disks.sort(key=lambda d: _DISK_ORDER[d.key])

        return cls(vmid, tuple(hostpci), tuple(disks), options.get("hookscript"), options, source)

    @classmethod
    def load(cls, root: Root, vmid: int) -> "VmConfig":
        path = root.pve("qemu-server", f"{vmid}.conf")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                f"VM {vmid}: config {path} does not exist",
                hint="is the VM on this node?",
            ) from None
        except OSError as e:
            raise ConfigError(f"VM {vmid}: cannot read config {path}: {e.strerror or e}") from None
        return cls.from_text(vmid, data.decode("utf-8", errors="replace"), str(path))
