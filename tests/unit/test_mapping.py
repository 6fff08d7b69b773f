from pathlib import Path

import pytest

from pvehook.errors import ConfigError
from pvehook.mapping import MapEntry, load_pci_mappings, parse_pci_mappings
from pvehook.paths import Root
from pvehook.pci import PciSelector

FIXTURE = Path(__file__).parent / "fixtures" / "pve" / "mapping" / "pci.cfg"


@pytest.fixture
def parsed():
    warnings: list[str] = []
    return parse_pci_mappings(FIXTURE.read_text(), warnings=warnings), warnings


def test_alternatives_in_file_order(parsed):
    maps, _ = parsed
    nvme = maps["fastNvme"]
    assert nvme.options == {"description": "Two identical NVMe drives"}
    assert [e.node for e in nvme.entries] == ["pve1", "pve1", "pve2"]
    first, second = nvme.for_node("pve1")
    assert first.paths == (PciSelector(0, 0x41, 0, 0),)
    assert first.id == "144d:a80a" and first.iommugroup == 30
    assert second.options["subsystem-id"] == "144d:a801"
    assert nvme.for_node("pve3") == ()


def test_multi_path_and_mdev(parsed):
    gpu = parsed[0]["someGpu"]
    assert gpu.mdev
    (entry,) = gpu.entries
    assert entry.paths == (PciSelector(0, 0xC, 0, 0), PciSelector(0, 0xC, 0, 1))
    assert entry.iommugroup is None


def test_bad_map_lines_skipped_like_proxmox(parsed):
    maps, warnings = parsed
    broken = maps["broken"]
    # no domain -> invalid; no path -> invalid; slot without function -> valid
    assert [e.paths for e in broken.entries] == [(PciSelector(0, 0x43, 0, None),)]
    assert any("41:00.0" in w for w in warnings)
    assert any("missing path" in w for w in warnings)
    assert "nomap" not in maps and any("nomap" in w for w in warnings)


def test_section_needs_blank_line_separator():
    # Proxmox's SectionConfig ends a section only at an empty line: a header right
    # after a section is ignored and its keys are added to the section before.
    text = "aa\n\tmap node=n,path=0000:01:00.0,id=1234:5678\nbb\n\tmap node=n,path=0000:02:00.0,id=1234:5678\n"
    warnings: list[str] = []
    maps = parse_pci_mappings(text, warnings=warnings)
    assert list(maps) == ["aa"] and len(maps["aa"].entries) == 2
    assert warnings


def test_comments_and_invalid_id():
    text = "# c\n1bad\n\tmap node=n,path=0000:01:00.0,id=1234:5678\n\nok\n  # c\n  map node=n,path=0000:01:00.0,id=1234:5678\n"
    maps = parse_pci_mappings(text)
    assert list(maps) == ["ok"]


def test_map_entry_strict_parse():
    with pytest.raises(ConfigError, match="unknown key"):
        MapEntry.parse("node=n,path=0000:01:00.0,id=1234:5678,color=red")
    with pytest.raises(ConfigError, match="iommugroup"):
        MapEntry.parse("node=n,path=0000:01:00.0,id=1234:5678,iommugroup=x")


def test_load_missing_file_is_empty(tmp_path):
    assert load_pci_mappings(Root(tmp_path)) == {}


def test_load(tmp_path):
    root = Root(tmp_path)
    root.pve("mapping").mkdir(parents=True)
    root.pve("mapping", "pci.cfg").write_bytes(FIXTURE.read_bytes())
    assert set(load_pci_mappings(root)) == {"fastNvme", "someGpu", "broken"}
