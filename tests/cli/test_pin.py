"""`pvehook pin`, register's pinning, and the pins in status, list, check and doctor
(issue 13), on the fake tree."""

from __future__ import annotations

import json
import os
import shutil

from fakesys import FakeNamespace

A, B = "0000:01:00.0", "0000:02:00.0"
HOOKSCRIPT = "hookscript: local:snippets/pvehook-hook\n"
SNIPPETS = """\
dir: local
\tpath /var/lib/vz
\tcontent iso,vztmpl,backup,snippets
"""


def two_drives(host):
    host.boot("boot-1")
    host.add_pci(A, group=1, serial="SA", namespaces=[FakeNamespace()])
    host.add_pci(B, group=2, serial="SB", namespaces=[FakeNamespace()])


def pins(host) -> dict:
    p = host.root.lib_dir / "pins.json"
    return json.loads(p.read_text())["vms"] if p.exists() else {}


def test_pin_show_accept_forget_without_pvesh(node, cli, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no pvesh, no pvesm: pin must not need them
    assert shutil.which("pvesh") is None
    two_drives(node)
    node.vm_config(100, f"hostpci0: {A}\n")
    code, out, err = cli("pin", 100)
    assert code == 0, err
    assert f"hostpci0 -> {A}: QEMU NVMe Ctrl SA (read from the controller): no pin yet" in out
    assert pins(node) == {}  # showing changes nothing

    code, out, err = cli("pin", 100, "--accept")
    assert code == 0, err
    assert f"VM 100 hostpci0: pinned QEMU NVMe Ctrl SA at {A}" in out
    assert pins(node)["100"]["hostpci0"][0]["identity"]["serial"] == "SA"

    node.renumber(A, B)
    code, out, err = cli("pin", 100)
    assert code == 0, err
    assert f"hostpci0 -> {A}: QEMU NVMe Ctrl SB (read from the controller): NOT the pinned drive" in out
    assert f"hostpci0 pinned: QEMU NVMe Ctrl SA (firmware 1.0), at {A} on" in out
    assert f"now: {B} (moved)" in out
    data = json.loads(cli("pin", 100, "--json")[1])
    assert data["drives"][0]["verdict"] == "mismatch"
    assert data["pinned"][0]["now_at"] == [B] and data["pinned"][0]["state"] == "moved"
    assert data["refusals"][0]["exit_code"] == 18

    code, out, err = cli("pin", 100, "--accept")
    assert code == 0, err
    assert f"VM 100 hostpci0: pinned QEMU NVMe Ctrl SB at {A} (was QEMU NVMe Ctrl SA)" in out
    assert json.loads(cli("pin", 100, "--json")[1])["drives"][0]["verdict"] == "ok"

    code, out, err = cli("pin", 100, "--forget")
    assert code == 0, err
    assert f"VM 100 hostpci0: forgot QEMU NVMe Ctrl SB (pinned at {A})" in out
    assert pins(node) == {}
    assert cli("pin", 100, "--accept", "--forget")[0] == 2


def test_accept_refuses_a_drive_it_cannot_identify(node, cli):
    two_drives(node)
    node.add_driver("vfio-pci")
    node.detach(A)
    node.attach(A, "vfio-pci")  # on vfio-pci since boot: no serial, no DSN, no record
    node.vm_config(100, f"hostpci0: {A}\n")
    code, out, err = cli("pin", 100, "--accept")
    assert code == 18, out + err
    assert f"cannot pin the drive at {A}: it is on vfio-pci" in err
    assert pins(node) == {}
    node.set_dsn(A, 0x1122334455667788)
    code, out, err = cli("pin", 100, "--accept")
    assert code == 0, err
    assert "pinned the drive with PCIe Device Serial Number 11-22-33-44-55-66-77-88" in out


def test_register_pins_local_vms_and_keeps_existing_pins(cluster, cli):
    two_drives(cluster.host)
    cluster.storage(SNIPPETS)
    cluster.vm(100, f"hostpci0: {A}\n")
    cluster.vm(101, f"hostpci0: {B}\n", node="pve2")
    other = cluster.path("/var/lib/vz/snippets/pvehook-hook", node="pve2")
    other.parent.mkdir(parents=True)
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    code, out, err = cli("register", 100, 101)
    assert code == 0, err
    assert f"VM 100 hostpci0: pinned QEMU NVMe Ctrl SA at {A}" in out
    assert "VM 101 on pve2: its drives are pinned at its first start there" in out
    assert list(pins(cluster.host)) == ["100"]
    assert pins(cluster.host)["100"]["hostpci0"][0]["how"] == "register"
    # registering again after a renumbering keeps the pin: only --accept replaces it
    cluster.host.renumber(A, B)
    code, out, err = cli("register", 100, "--json")
    assert code == 0, err
    assert json.loads(out)["pins"] == []
    assert pins(cluster.host)["100"]["hostpci0"][0]["identity"]["serial"] == "SA"


def test_status_list_check_doctor_show_pins(node, cli, hook):
    two_drives(node)
    node.set_dsn(B, 0x0025384C41A0E5F7)
    node.vm_config(100, HOOKSCRIPT + f"hostpci0: {A}\n")
    node.vm_config(101, HOOKSCRIPT + f"hostpci0: {B}\n")
    assert cli("pin", 100, "--accept")[0] == 0
    assert cli("pin", 101, "--accept")[0] == 0

    status = {c["address"]: c for c in json.loads(cli("status", "--json")[1])}
    assert status[A]["identity"]["serial"] == "SA" and status[A]["identity_source"] == "nvme"
    assert status[A]["pinned_for"] == ["VM 100 (hostpci0)"]
    assert status[B]["identity"]["dsn"] == "00-25-38-4c-41-a0-e5-f7"
    code, out, _ = cli("status")
    assert "drive: QEMU NVMe Ctrl SA, firmware 1.0; pinned for VM 100 (hostpci0)" in out
    findings = [f for f in json.loads(cli("doctor", "--json")[1]) if f["check"] == "pins"]
    assert [f["status"] for f in findings] == ["ok", "ok"]

    node.renumber(A, B)
    code, out, _ = cli("list")
    assert f"hostpci0 pinned: QEMU NVMe Ctrl SA: moved ({B})" in out
    data = {vm["vmid"]: vm for vm in json.loads(cli("list", "--json")[1])}
    assert data[100]["pins"][0]["state"] == "moved" and data[100]["pins"][0]["now_at"] == [B]
    code, out, _ = cli("check", 100)
    assert code == 18
    assert f"refused: {A} now holds QEMU NVMe Ctrl SB, the pinned drive of VM 101" in out
    data = json.loads(cli("check", 100, "--json")[1])
    assert data["exit_code"] == 18 and data["pins"][0]["verdict"] == "mismatch"
    assert data["refusals"][0]["kind"] == "DriveMismatchError"
    assert hook(100, "pre-start")[0] == 18  # the same code as the hook
    code, out, _ = cli("doctor")
    assert code == 9
    assert (f"[error] pins: VM 100 hostpci0: its pinned drive QEMU NVMe Ctrl SA moved to {B}"
            f" (pinned at {A}): the VM will not start") in out
    assert "fix: update hostpci0, or `pvehook pin 100 --accept`" in out
    # a drive taken out of the node: missing
    node.detach(B)
    spec = json.loads((node.fake / f"{B}.json").read_text())
    spec["serial"] = "OTHER"
    (node.fake / f"{B}.json").write_text(json.dumps(spec))
    node.attach(B, "nvme")
    out = cli("doctor")[1]
    assert "VM 100 hostpci0: its pinned drive QEMU NVMe Ctrl SA is not on this node" in out
    assert os.stat(node.root.lib_dir / "pins.json").st_mode & 0o777 == 0o600
