"""Check the readers against qemu-server's own test configs and expected command lines.

The corpus (a copy of qemu-server's src/test/{cfg2cmd,parse-config-input,snapshot-input})
lives outside the repository: $PVEHOOK_CORPUS, or ../shared/corpus/qemu-server next to
the repository root. Its README describes the environment the .cmd files assume; it is
rebuilt here. Each comparison also asserts a minimum coverage, so a shrinking corpus or
an over-eager skip does not pass silently.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest

from pvehook.mapping import parse_pci_mappings
from pvehook.pci import PciAddress
from pvehook.resolve import resolve_vm
from pvehook.storagecfg import lvm_volume, parse_storage_cfg
from pvehook.vmconfig import VmConfig

REPO = Path(__file__).resolve().parents[2]
CORPUS = Path(os.environ.get("PVEHOOK_CORPUS") or REPO.parent / "shared" / "corpus" / "qemu-server")

if not (CORPUS / "cfg2cmd").is_dir():
    pytest.skip(f"qemu-server corpus not found at {CORPUS}", allow_module_level=True)

VMID = 8006
NODE = "localhost"
EXISTING = [
    PciAddress.parse(a)
    for a in (
        "0000:00:43.1 0000:00:f4.0 0000:00:ff.1 0000:0f:f2.0 0000:d0:13.0 0000:d0:15.1 "
        "0000:d0:15.2 0000:d0:17.0 0000:f0:42.0 0000:f0:43.0 0000:f0:43.1 1234:f0:43.1 "
        "0000:01:00.4 0000:01:00.5 0000:01:00.6 0000:07:10.0 0000:07:10.1 0000:07:10.4"
    ).split()
]
PCI_CFG = """\
someGpu
\tmdev 1
\tmap node=localhost,path=0000:01:00.4,id=10de:2231,iommugroup=1
\tmap node=localhost,path=0000:01:00.5,id=10de:2231,iommugroup=1
\tmap node=localhost,path=0000:01:00.6,id=10de:2231,iommugroup=1

someNic
\tmap node=localhost,path=0000:07:10.0,id=8086:1520,iommugroup=2
\tmap node=localhost,path=0000:07:10.1,id=8086:1520,iommugroup=2
\tmap node=localhost,path=0000:07:10.4,id=8086:1520,iommugroup=2
"""
STORAGE_CFG = """\
dir: local
\tpath /var/lib/vz
\tcontent images,iso,snippets

dir: localsnapext
\tpath /var/lib/vzsnapext
\tcontent images
\tsnapshot-as-volume-chain 1

dir: noimages
\tpath /var/lib/vz
\tcontent iso

btrfs: btrfs-store
\tpath /butter/bread
\tcontent images

cifs: cifs-store
\tpath /mnt/pve/cifs-store
\tserver 10.0.0.1
\tshare s
\tcontent images

rbd: rbd-store
\tpool cpool
\tcontent images

rbd: krbd-store
\tpool cpool
\tkrbd 1
\tcontent images

zfs: zfs-over-iscsi-store
\tpool tank
\tportal 10.0.0.1
\ttarget iqn.2019-10.org.test:foobar
\tiscsiprovider iet
\tcontent images

lvm: lvm-store
\tvgname veegee
\tcontent images

lvmthin: local-lvm
\tvgname pve
\tthinpool data
\tcontent images
"""
MAPPINGS = parse_pci_mappings(PCI_CFG)
STORAGES = parse_storage_cfg(STORAGE_CFG)
LVM_VGS = {s.vgname for s in STORAGES.values() if s.type in ("lvm", "lvmthin")}

CFG2CMD = sorted((CORPUS / "cfg2cmd").glob("*.conf"))
HOSTPCI_RE = re.compile(r"^hostpci\d+:", re.M)


def _runnable(conf: Path) -> bool:
    return "# EXPECT_ERROR:" not in conf.read_text() and conf.with_name(conf.name + ".cmd").exists()


def _cmd_args(conf: Path) -> list[str]:
    return shlex.split(conf.with_name(conf.name + ".cmd").read_text())


def _option_values(args: list[str], option: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == option]


def _vfio_devices(args: list[str]) -> dict[str, list[dict[str, str]]]:
    """-device vfio-pci,... grouped by hostpci key (id=hostpci3 or hostpci0.1)."""
    res: dict[str, list[dict[str, str]]] = {}
    for dev in _option_values(args, "-device"):
        if not dev.startswith("vfio-pci,"):
            continue
        props = dict(p.split("=", 1) for p in dev.split(",")[1:])
        res.setdefault(props["id"].split(".")[0], []).append(props)
    return res


def _filenames(node) -> set[str]:
    if isinstance(node, dict):
        found = {node["filename"]} if isinstance(node.get("filename"), str) else set()
        for v in node.values():
            found |= _filenames(v)
        return found
    if isinstance(node, list):
        return set().union(*map(_filenames, node)) if node else set()
    return set()


def _lvm_paths_in_cmd(args: list[str]) -> set[str]:
    paths: set[str] = set()
    for bd in _option_values(args, "-blockdev"):
        paths |= _filenames(json.loads(bd)) if bd.startswith("{") else set()
    for drive in _option_values(args, "-drive"):
        paths |= {p[len("file="):] for p in drive.split(",") if p.startswith("file=")}
    return {p for p in paths if p.split("/")[1:3][0:1] == ["dev"] and p.split("/")[2] in LVM_VGS}


HOSTPCI_CONFS = [c for c in CFG2CMD if HOSTPCI_RE.search(c.read_text()) and _runnable(c)]


@pytest.mark.parametrize("conf", HOSTPCI_CONFS, ids=lambda c: c.name)
def test_hostpci_matches_qemu_server(conf):
    cfg = VmConfig.from_text(VMID, conf.read_text())
    resolved = resolve_vm(cfg, EXISTING, MAPPINGS, NODE, lambda a: False)
    devices = _vfio_devices(_cmd_args(conf))
    ours: dict[str, list[str]] = {}
    for entry, addrs in resolved:
        if entry.mdev is not None:
            # qemu-server passes an mdev (sysfsdev=), not the parent function
            assert [d.get("sysfsdev") for d in devices[entry.key]][0].startswith("/sys/bus/mdev/")
            continue
        ours[entry.key] = [str(a) for a in addrs]
    theirs = {
        key: [str(PciAddress.parse(d["host"])) for d in devs]
        for key, devs in devices.items()
        if all("host" in d for d in devs)
    }
    assert ours == theirs
    for key, devs in devices.items():  # multifunction exactly when several functions
        if key in ours:
            assert (devs[0].get("multifunction") == "on") == (len(ours[key]) > 1), key


@pytest.mark.parametrize("conf", HOSTPCI_CONFS, ids=lambda c: c.name)
def test_qemu_server_rules_accept_what_qemu_server_starts(conf):
    """pcie=1 with q35 (machine types of every form) and the rest: no false refusal."""
    from pvehook.qemuserver import hostpci_errors

    assert hostpci_errors(VmConfig.from_text(VMID, conf.read_text())) == []


def test_hostpci_coverage():
    counted = [c.name for c in HOSTPCI_CONFS]
    print(f"\nhostpci: {len(counted)} corpus configs compared: {', '.join(counted)}")
    assert len(counted) >= 8


def _lvm_cases():
    cases = []
    for conf in CFG2CMD:
        if not _runnable(conf):
            continue
        cfg = VmConfig.from_text(VMID, conf.read_text())
        vols = [v for v in (lvm_volume(STORAGES, d) for d in cfg.disks) if v]
        cmd_paths = _lvm_paths_in_cmd(_cmd_args(conf))
        if vols or cmd_paths:
            cases.append((conf, {v.dev_path for v in vols}, cmd_paths))
    return cases


LVM_CASES = _lvm_cases()


@pytest.mark.parametrize("conf, ours, theirs", LVM_CASES, ids=lambda x: x.name if isinstance(x, Path) else "")
def test_lvm_paths_match_qemu_server(conf, ours, theirs):
    assert ours <= theirs
    # what else qemu-server opens on those VGs is the backing chain of external
    # (qcow2-on-LVM) snapshots: snap<N>-<lv> next to the current volume
    extra = theirs - ours
    for path in extra:
        vg_dir, _, name = path.rpartition("/")
        assert any(name.endswith("-" + o.rpartition("/")[2]) and o.startswith(vg_dir + "/") for o in ours), path
        assert name.startswith("snap")


def test_lvm_coverage():
    names = [c.name for c, _, _ in LVM_CASES]
    print(f"\nlvm: {len(names)} corpus configs compared: {', '.join(names)}")
    assert len(names) >= 9


def _section_inputs():
    return sorted((CORPUS / "parse-config-input").glob("*.conf")) + sorted(
        (CORPUS / "snapshot-input").glob("*.conf")
    )


def _naive_main_keys(text: str) -> set[str]:
    keys = set()
    for line in text.split("\n"):
        if line.startswith("["):
            break
        m = re.match(r"^([a-z][a-z_\-]*\d*):", line)
        if m:
            keys.add("ide2" if m[1] == "cdrom" else m[1])
    return keys


@pytest.mark.parametrize("conf", _section_inputs() + CFG2CMD, ids=lambda c: f"{c.parent.name}/{c.name}")
def test_every_config_parses(conf):
    text = conf.read_text()
    cfg = VmConfig.from_text(VMID, text)
    keys = set(cfg.options) - {"description"}
    assert keys == _naive_main_keys(text) - {"description"}


def test_section_inputs_main_section():
    def load(name):
        return VmConfig.from_text(VMID, (CORPUS / "parse-config-input" / name).read_text())

    sections = load("sections.conf")
    assert "bios" not in sections.options  # [PENDING]
    assert "snaptime" not in sections.options  # [foo]
    assert sections.options["parent"] == "foo"
    assert sections.options["ipconfig0"] == "ip6=dhcp"  # not [special:cloudinit]'s
    assert [d.key for d in sections.disks] == ["ide2", "scsi0"]  # unused0 excluded
    assert sections.disk("ide2").is_cdrom and sections.disk("ide2").is_cloudinit

    cloudinit = load("cloudinit-snapshot.conf")
    assert cloudinit.options["numa"] == "0"  # the snapshot [cloudinit] has a bad numa
    assert cloudinit.options["ipconfig0"] == "ip6=dhcp"

    assert load("duplicate-sections.conf").options["name"] == "deb122"
    assert load("unknown-sections.conf").options["name"] == "deb1223"
    assert "fleecing-images" not in load("fleecing-section.conf").options

    locked = load("locked.conf")
    assert locked.options["lock"] == "backup" and locked.description == " locked"

    efi = load("regular-vm-efi.conf")
    assert [d.key for d in efi.disks] == ["ide2", "scsi0", "efidisk0"]
    assert efi.disk("efidisk0").storage == "mydir"

    snap = VmConfig.from_text(101, (CORPUS / "snapshot-input" / "101.conf").read_text())
    assert snap.options["cores"] == "2" and "machine" not in snap.options


def test_section_inputs_coverage():
    n = len(_section_inputs())
    print(f"\nsection structure: {n} parse-config-input/snapshot-input configs, {len(CFG2CMD)} cfg2cmd configs parsed")
    assert n >= 20
