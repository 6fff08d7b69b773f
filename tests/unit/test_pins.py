"""Drive pins on the fake kernel (issue 13): a VM gets the drive it was given, not
whatever sits at its address after a renumbering. Each test asserts on what the tree
shows afterwards: drivers, the undo record, the pin store."""

from __future__ import annotations

import json
import os
import stat

from fakesys import FakeNamespace, record

A = "0000:01:00.0"
B = "0000:02:00.0"


def nvme(host, addr, group, serial, **kw):
    host.add_pci(addr, group=group, serial=serial, namespaces=[FakeNamespace()], **kw)


def two_drives(host):
    host.boot("boot-1")
    nvme(host, A, 1, "WD-2134")
    host.set_identity(A, model="WDS200T2X0E", firmware="620361WD", nguid=["e8238fa6bf530001001b448b4a6a8d1c"])
    nvme(host, B, 2, "S7KHNJ0W")
    host.set_identity(B, model="Samsung SSD 990 PRO 2TB", firmware="4B2QJXD7", eui=["0025384c41a0e5f7"])


def store(host) -> dict:
    return json.loads((host.root.lib_dir / "pins.json").read_text())


def started_and_stopped(hook, vmid):
    code, out = hook(vmid, "pre-start")
    assert code == 0, out
    assert hook(vmid, "post-stop")[0] == 0
    return out


def test_first_start_pins_the_drive_and_says_so(host, hook):
    two_drives(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    out = started_and_stopped(hook, 100)
    assert (f"{A}: pinned WDS200T2X0E WD-2134 as the drive of VM 100 hostpci0 (trust on first"
            " use") in out
    pin = store(host)["vms"]["100"]["hostpci0"][0]
    assert pin["address"] == A and pin["how"] == "first start"
    ident = pin["identity"]
    assert (ident["serial"], ident["model"], ident["firmware"]) == ("WD-2134", "WDS200T2X0E", "620361WD")
    assert ident["subsysnqn"] == "nqn.2019-08.org.qemu:WD-2134"
    assert ident["namespaces"][0]["nguid"] == "e8238fa6bf530001001b448b4a6a8d1c"
    assert ident["namespaces"][0]["wwid"] == "nvme.1b36-WD-2134"
    # root only: the directory 0700, the file 0600
    assert stat.S_IMODE(os.stat(host.root.lib_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(host.root.lib_dir / "pins.json").st_mode) == 0o600
    # the next start finds the pinned drive and pins nothing new
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert f"{A}: VM 100's pinned drive WDS200T2X0E WD-2134 (read from the controller)" in out
    assert "trust on first use" not in out


def test_a_failed_first_start_pins_nothing(host, hook):
    two_drives(host)
    host.fault(A, "probe", "errno", 5, driver="vfio-pci")
    host.add_driver("vfio-pci")
    host.vm_config(100, f"hostpci0: {A}\n")
    code, out = hook(100, "pre-start")
    assert code == 13, out
    assert not (host.root.lib_dir / "pins.json").exists()


def test_renumbered_drives_are_refused_and_nothing_moves(host, hook):
    two_drives(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    host.vm_config(101, f"hostpci0: {B}\n")
    started_and_stopped(hook, 100)
    started_and_stopped(hook, 101)
    host.renumber(A, B)  # a reboot after which the two drives trade addresses
    before = host.namespaces_of(A), host.namespaces_of(B)

    code, out = hook(100, "pre-start")
    assert code == 18, out
    assert (f"error: {A} now holds Samsung SSD 990 PRO 2TB S7KHNJ0W, the pinned drive of VM 101"
            f" (hostpci0) (not VM 100's WDS200T2X0E WD-2134); that drive is at {B}; update"
            f" hostpci0, or run `pvehook pin 100 --accept` to accept the drive at {A}") in out
    assert "VM 100 not started" in out
    assert host.driver_of(A) == host.driver_of(B) == "nvme"
    assert (host.namespaces_of(A), host.namespaces_of(B)) == before
    assert record(host, 100) is None
    # the admin updates hostpci0: the drive is found at its new address and starts
    host.vm_config(100, f"hostpci0: {B}\n")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert host.driver_of(B) == "vfio-pci" and host.driver_of(A) == "nvme"


def test_a_replaced_drive_is_refused(host, hook):
    two_drives(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    started_and_stopped(hook, 100)
    # the drive at A is another one now (swapped for a new one, same slot)
    host.detach(A)
    spec = json.loads((host.fake / f"{A}.json").read_text())
    spec["serial"] = "NEW-1"
    (host.fake / f"{A}.json").write_text(json.dumps(spec))
    host.attach(A, "nvme")
    code, out = hook(100, "pre-start")
    assert code == 18, out
    assert (f"{A} now holds WDS200T2X0E NEW-1 (not VM 100's WDS200T2X0E WD-2134); that drive is"
            " not on this node") in out
    assert host.driver_of(A) == "nvme"


def test_firmware_update_is_the_same_drive(host, hook):
    two_drives(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    started_and_stopped(hook, 100)
    host.set_identity(A, firmware="731100WD")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert "since pinned: firmware 620361WD -> 731100WD" in out


# -- a controller already on vfio-pci --------------------------------------------------------

def test_on_vfio_pci_recorded_identity_counts_in_this_boot_only(host, hook):
    two_drives(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    assert hook(100, "pre-start")[0] == 0  # pinned; the VM stops without giving it back
    assert host.driver_of(A) == "vfio-pci"
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert f"{A}: VM 100's pinned drive WDS200T2X0E WD-2134 (as recorded when it was last on nvme" in out
    host.boot("boot-2")  # a reboot: what was recorded then says nothing about now
    code, out = hook(100, "pre-start")
    assert code == 18, out
    assert (f"{A}: cannot confirm it holds VM 100's pinned drive WDS200T2X0E WD-2134: it is on"
            " vfio-pci, has no PCIe Device Serial Number and was not seen on nvme since this"
            " boot began") in out
    assert host.driver_of(A) == "vfio-pci"


def test_on_vfio_pci_the_device_serial_number_decides(host, hook):
    two_drives(host)
    host.set_dsn(A, 0x0025_3844_1A0E_5F71)
    host.set_dsn(B, 0x0025_3844_1A0E_9999)
    host.vm_config(100, f"hostpci0: {A}\n")
    host.vm_config(101, f"hostpci0: {B}\n")
    started_and_stopped(hook, 101)
    assert hook(100, "pre-start")[0] == 0  # stays on vfio-pci
    assert store(host)["vms"]["100"]["hostpci0"][0]["identity"]["dsn"] == "00-25-38-44-1a-0e-5f-71"
    host.boot("boot-2")
    code, out = hook(100, "pre-start")
    assert code == 0, out
    assert ("VM 100's pinned drive WDS200T2X0E WD-2134 (by its PCIe Device Serial Number"
            " 00-25-38-44-1a-0e-5f-71)") in out
    host.renumber(A, B)  # the drive on vfio-pci at A is now VM 101's
    code, out = hook(100, "pre-start")
    assert code == 18, out
    assert (f"{A} now holds Samsung SSD 990 PRO 2TB S7KHNJ0W (by its PCIe Device Serial Number"
            " 00-25-38-44-1a-0e-99-99), the pinned drive of VM 101 (hostpci0) (not VM 100's"
            f" WDS200T2X0E WD-2134); that drive is at {B}") in out
    assert host.driver_of(A) == "vfio-pci" and host.driver_of(B) == "nvme"


def test_dsn_walk_stops_on_a_looping_or_empty_chain(host):
    from pvehook.identity import read_dsn
    from pvehook.pci import PciAddress, PciDevice

    two_drives(host)
    dev = PciDevice(host.root, PciAddress.parse(A))
    assert read_dsn(dev) is None  # no extended capabilities at all
    cfg = bytearray((host.device_dir(A) / "config").read_bytes())
    cfg[0x100:0x104] = (0x0001 | 0x100 << 20).to_bytes(4, "little")  # points at itself
    (host.device_dir(A) / "config").write_bytes(bytes(cfg))
    assert read_dsn(dev) is None
    (host.device_dir(A) / "config").write_bytes(bytes(cfg[:64]))  # what a non-root reader gets
    assert read_dsn(dev) is None
    host.set_dsn(A, 0)  # a zero DSN is no serial
    assert read_dsn(dev) is None
    host.set_dsn(A, 0x1122334455667788)
    assert read_dsn(dev) == "11-22-33-44-55-66-77-88"


# -- mapping= with several alternatives ------------------------------------------------------

def mapping(host, *paths):
    host.root.pve("mapping").mkdir(parents=True, exist_ok=True)
    host.root.pve("mapping", "pci.cfg").write_text(
        "disks\n" + "".join(f"\tmap node=pve1,path={p},id=1b36:0010,iommugroup={group(host, p)}\n"
                             for p in paths))


def group(host, addr: str) -> str:
    """The IOMMU group a map line must name (qemu-server checks it, PVE::Mapping::PCI)."""
    return (host.device_dir(addr) / "iommu_group").resolve().name


def test_mapping_takes_the_pinned_second_alternative_when_qemu_server_does(host, hook):
    two_drives(host)
    mapping(host, A, B)
    host.vm_config(102, "hostpci0: mapping=disks\n")
    host.vm_config(101, f"hostpci0: {A}\n")
    started_and_stopped(hook, 102)  # pinned: the drive at A, the first free alternative
    host.renumber(A, B)  # that drive is at B now, the second alternative

    # A is free: qemu-server would pass A, so the hook must not bind B in its place
    code, out = hook(102, "pre-start")
    assert code == 18, out
    assert (f"{A} now holds Samsung SSD 990 PRO 2TB S7KHNJ0W (not VM 102's WDS200T2X0E"
            f" WD-2134); that drive is at {B}, alternative 2 of mapping 'disks', but qemu-server"
            " takes the first free alternative; put that map line first") in out
    assert host.driver_of(A) == host.driver_of(B) == "nvme"

    # VM 101 runs with A: qemu-server takes B, the pinned drive, and so does the hook
    assert hook(101, "pre-start")[0] == 0
    host.root.run("qemu-server", "101.pid").write_text(f"{os.getpid()}\n")
    host.root.run("qemu-server", "pci-id-reservations").write_text(f"{A} 101 pid:{os.getpid()}\n")
    code, out = hook(102, "pre-start")
    assert code == 0, out
    assert f"{B}: VM 102's pinned drive WDS200T2X0E WD-2134 (read from the controller)" in out
    assert host.driver_of(B) == "vfio-pci"


def test_mapping_pinned_first_alternative(host, hook):
    two_drives(host)
    mapping(host, A, B)
    host.vm_config(102, "hostpci0: mapping=disks\n")
    started_and_stopped(hook, 102)
    code, out = hook(102, "pre-start")
    assert code == 0, out
    assert host.driver_of(A) == "vfio-pci" and host.driver_of(B) == "nvme"


def test_identical_twins_are_told_apart_by_serial(host, hook):
    """Two drives of one model (same vendor:device, model, firmware): what Proxmox's
    mapping= and vfio-pci ids= cannot tell apart."""
    host.boot("boot-1")
    nvme(host, A, 1, "TWIN-1")
    nvme(host, B, 2, "TWIN-2")
    for addr in (A, B):
        host.set_identity(addr, subsysnqn="nqn.2014.08.org.nvmexpress:1b361b36QEMU NVMe Ctrl")
    host.vm_config(100, f"hostpci0: {A}\n")
    started_and_stopped(hook, 100)
    host.renumber(A, B)
    code, out = hook(100, "pre-start")
    assert code == 18, out
    assert (f"{A} now holds QEMU NVMe Ctrl TWIN-2 (not VM 100's QEMU NVMe Ctrl TWIN-1); that"
            f" drive is at {B}") in out
    assert host.driver_of(A) == "nvme"


def test_a_damaged_or_planted_store_refuses_clearly(host, hook):
    two_drives(host)
    host.vm_config(100, f"hostpci0: {A}\n")
    started_and_stopped(hook, 100)
    path = host.root.lib_dir / "pins.json"
    path.write_text("{not json")
    code, out = hook(100, "pre-start")
    assert code == 1 and f"the pin store {path} is damaged" in out, out
    path.unlink()
    path.symlink_to(host.base / "elsewhere.json")
    (host.base / "elsewhere.json").write_text("{}")
    code, out = hook(100, "pre-start")
    assert code == 1 and f"cannot open the pin store {path}" in out, out
    assert host.driver_of(A) == "nvme"


def test_a_new_entry_does_not_take_another_vms_drive_on_trust(host, hook):
    """The issue's worst case: a line that names another VM's disk while that VM is off."""
    two_drives(host)
    host.vm_config(101, f"hostpci0: {B}\n")
    started_and_stopped(hook, 101)
    host.vm_config(100, f"hostpci0: {B}\n")  # a typo, or a copied config
    code, out = hook(100, "pre-start")
    assert code == 18, out
    assert (f"{B} holds Samsung SSD 990 PRO 2TB S7KHNJ0W, the pinned drive of VM 101 (hostpci0);"
            " hostpci0 of VM 100 has no pinned drive yet, and pvehook does not give another VM's"
            " drive on trust") in out
    assert host.driver_of(B) == "nvme"
    assert "100" not in store(host)["vms"]
