from pathlib import Path

import pytest

from pvehook.errors import ConfigError, DeviceNotFoundError
from pvehook.mapping import parse_pci_mappings
from pvehook.pci import PciAddress
from pvehook.resolve import resolve_hostpci, resolve_vm
from pvehook.vmconfig import HostPci, VmConfig

PVE = Path(__file__).parent / "fixtures" / "pve"
A = PciAddress.parse

EXISTING = [
    A(x)
    for x in (
        "0000:01:00.0", "0000:02:00.0", "0000:02:00.1", "0000:03:00.0", "0000:03:00.1",
        "0000:41:00.0", "0000:42:00.0", "0000:43:00.0", "0000:43:00.1", "0000:0c:00.0",
        "0000:0c:00.1", "0001:02:00.0",
    )
]
MAPS = parse_pci_mappings((PVE / "mapping" / "pci.cfg").read_text())


def never(_addr):
    return False


def resolve(value, taken=never, node="pve1"):
    return resolve_hostpci(HostPci.parse("hostpci0", value), EXISTING, MAPS, node, taken)


def test_exact_with_and_without_domain():
    assert resolve("0000:01:00.0") == (A("0000:01:00.0"),)
    assert resolve("01:00.0") == (A("0000:01:00.0"),)
    assert resolve("0001:02:00.0") == (A("0001:02:00.0"),)


def test_slot_means_every_function_of_domain_0():
    assert resolve("02:00") == (A("0000:02:00.0"), A("0000:02:00.1"))


def test_joined_ids():
    assert resolve("03:00.1;01:00.0") == (A("0000:03:00.1"), A("0000:01:00.0"))


def test_host_ignores_taken():
    # qemu-server reserves host= devices later and fails there; the caller checks that
    assert resolve("01:00.0", taken=lambda a: True) == (A("0000:01:00.0"),)


def test_not_found_names_id():
    with pytest.raises(DeviceNotFoundError, match="'0000:05:00.0'"):
        resolve("01:00.0;05:00.0")
    with pytest.raises(DeviceNotFoundError, match="'0000:05:00'"):
        resolve("05:00")


def test_mapping_first_free():
    assert resolve("mapping=fastNvme") == (A("0000:41:00.0"),)
    taken = {A("0000:41:00.0")}
    assert resolve("mapping=fastNvme", taken=taken.__contains__) == (A("0000:42:00.0"),)
    with pytest.raises(DeviceNotFoundError, match="could not find a free device"):
        resolve("mapping=fastNvme", taken=lambda a: True)


def test_mapping_single_alternative_taken_anyway():
    assert resolve("mapping=broken", taken=lambda a: True) == (A("0000:43:00.0"), A("0000:43:00.1"))


def test_mapping_errors():
    with pytest.raises(DeviceNotFoundError, match="mapping not found for 'nope'"):
        resolve("mapping=nope")
    with pytest.raises(DeviceNotFoundError, match="on node 'pve9'"):
        resolve("mapping=fastNvme", node="pve9")
    # an alternative that does not exist fails the entry, as in qemu-server
    with pytest.raises(DeviceNotFoundError, match="0000:01:00.0"):
        resolve_hostpci(HostPci.parse("hostpci0", "mapping=fastNvme"), EXISTING[1:], MAPS, "pve2", never)


def test_mdev_multifunction_refused():
    with pytest.raises(ConfigError, match="mediated"):
        resolve("mapping=someGpu,mdev=foo")


def test_resolve_vm_fixture():
    cfg = VmConfig.from_text(100, (PVE / "qemu-server" / "100.conf").read_text())
    res = resolve_vm(cfg, EXISTING, MAPS, "pve1", never)
    assert [(h.key, addrs) for h, addrs in res] == [
        ("hostpci0", (A("0000:01:00.0"),)),
        ("hostpci1", (A("0000:02:00.0"), A("0000:02:00.1"))),
        ("hostpci2", (A("0000:03:00.0"), A("0000:03:00.1"))),
        ("hostpci3", (A("0000:41:00.0"),)),
    ]


def test_resolve_vm_own_choices_and_others():
    cfg = VmConfig.from_text(1, "hostpci0: mapping=fastNvme\nhostpci1: mapping=fastNvme\n")
    res = resolve_vm(cfg, EXISTING, MAPS, "pve1", never)
    assert [a for _, a in res] == [(A("0000:41:00.0"),), (A("0000:42:00.0"),)]
    held = {A("0000:41:00.0")}
    with pytest.raises(DeviceNotFoundError, match="hostpci1: could not find a free device"):
        resolve_vm(cfg, EXISTING, MAPS, "pve1", held.__contains__)


def test_resolve_vm_twice_assigned():
    cfg = VmConfig.from_text(1, "hostpci0: 02:00\nhostpci1: 02:00.1\n")
    with pytest.raises(ConfigError, match="0000:02:00.1 assigned more than once.*hostpci0 and hostpci1"):
        resolve_vm(cfg, EXISTING, MAPS, "pve1", never)
    cfg = VmConfig.from_text(1, "hostpci0: 02:00;02:00.1\n")
    with pytest.raises(ConfigError, match="more than once"):
        resolve_vm(cfg, EXISTING, MAPS, "pve1", never)


def test_resolve_vm_mdev_does_not_take():
    text = "hostpci0: mapping=fastNvme,mdev=x\nhostpci1: mapping=fastNvme\n"
    res = resolve_vm(VmConfig.from_text(1, text), EXISTING, MAPS, "pve1", never)
    assert [a for _, a in res] == [(A("0000:41:00.0"),), (A("0000:41:00.0"),)]


def test_template_has_no_hostpci():
    cfg = VmConfig.from_text(1, "template: 1\nhostpci0: 05:00.0\n")
    assert resolve_vm(cfg, EXISTING, MAPS, "pve1", never) == []
