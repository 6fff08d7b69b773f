"""status, iommu, check and doctor on the fake sysfs tree (no Proxmox API needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fakesys import BRIDGE_CLASS, NIC_CLASS, FakeNamespace

def vm_config(host, vmid: int, text: str) -> None:
    host.root.pve("qemu-server", f"{vmid}.conf").write_text(text)


A, B, NIC = "0000:01:00.0", "0000:02:00.0", "0000:03:00.0"


def two_nvme(host):
    host.add_pci(A, group=1, serial="SA", namespaces=[FakeNamespace(partitions=1)])
    host.add_pci(B, group=2, serial="SB", namespaces=[FakeNamespace()])


def test_status(node, cli):
    two_nvme(node)
    node.mount(node.namespaces_of(B)[0], "/srv")
    vm_config(node, 100, f"hostpci0: {A}\n")
    code, out, err = cli("status")
    assert code == 0, err
    assert f"{A}  1b36:0010  QEMU NVMe Ctrl  serial SA" in out
    assert "IOMMU group 1: isolated" in out
    assert "is mounted at /srv" in out
    assert "named by VM: 100; held by: nobody" in out
    code, out, _ = cli("status", "--json")
    data = {c["address"]: c for c in json.loads(out)}
    assert data[A]["vms"] == [100] and data[B]["vms"] == []
    assert data[A]["namespaces"][0]["host_use"] == []
    assert data[B]["namespaces"][0]["host_use"]
    code, out, _ = cli("status", 100, "--json")
    assert [c["address"] for c in json.loads(out)] == [A]
    code, _, err = cli("status", 555)
    assert code == 1 and "VM 555" in err


def test_iommu(node, cli):
    two_nvme(node)
    node.add_pci("0000:00:01.0", cls=BRIDGE_CLASS, group=2)
    node.add_pci(NIC, cls=NIC_CLASS, group=2)
    code, out, err = cli("iommu")
    assert code == 0, err
    assert "group 1: can be given to a VM" in out
    assert "group 2: only as a whole" in out and f"{NIC} (e1000e)" in out
    data = json.loads(cli("iommu", "--json")[1])
    assert data["iommu_enabled"] is True
    assert [(g["group"], g["ok"]) for g in data["groups"]] == [(1, True), (2, False)]


def test_check_matches_the_hook(node, cli, hook):
    two_nvme(node)
    node.add_pci(NIC, cls=NIC_CLASS, group=2)
    node.add_netif(NIC, "eno1", up=True, master="vmbr0")  # the node's uplink
    vm_config(node, 100, f"hostpci0: {A}\n")
    vm_config(node, 101, f"hostpci0: {B}\n")
    code, out, err = cli("check", 100)
    assert code == 0, err
    assert f"would bind {A}: nvme -> vfio-pci" in out
    assert "the hook would let VM 100 start" in out
    assert "pvehook register 100" in out
    code, out, err = cli("check", 101)
    assert code == 11
    assert f"{NIC} (e1000e, class 020000) is in IOMMU group 2" in out
    assert "eno1 (up) is a port of vmbr0" in out
    assert node.driver_of(A) == "nvme" and node.driver_of(B) == "nvme"  # nothing changed
    assert not node.root.state_dir.exists()
    assert hook(101, "pre-start")[0] == 11  # the same code as the hook
    data = json.loads(cli("check", 101, "--json")[1])
    assert data["exit_code"] == 11 and data["refusals"][0]["kind"] == "InUseError"


def test_check_disk_in_use_and_missing_vm(node, cli):
    two_nvme(node)
    node.mount(node.namespaces_of(A)[1], "/data")
    vm_config(node, 100, f"hostpci0: {A}\n")
    code, out, _ = cli("check", 100)
    assert code == 11 and "is mounted at /data" in out
    vm_config(node, 102, "hostpci0: 0000:09:00.0\n")
    assert cli("check", 102)[0] == 3
    code, _, err = cli("check", 999)
    assert code == 1 and "VM 999" in err and err.count("\n") == 1


def test_doctor(node, cli):
    two_nvme(node)
    root = node.base
    (root / "proc/cmdline").write_text("BOOT_IMAGE=/vmlinuz root=/dev/sda1 intel_iommu=on\n")
    (root / "proc/interrupts").write_text("  24:  0  IR-PCI-MSI 512000-edge  nvme0q0\n")
    (root / "etc/modprobe.d").mkdir(parents=True)
    (root / "etc/modprobe.d/vfio.conf").write_text("options vfio-pci ids=1b36:0010,10de:1b80\n")
    (root / "etc/pve/storage.cfg").write_text("dir: local\n\tpath /var/lib/vz\n\tcontent iso\n")
    vm_config(node, 100, "memory: 512\nhookscript: local:snippets/pvehook-hook\n")
    (root / "proc/sys/kernel").mkdir(parents=True, exist_ok=True)
    (root / "proc/sys/kernel/osrelease").write_text("6.14.8-2-pve\n")
    mods = root / "lib/modules/6.14.8-2-pve"
    mods.mkdir(parents=True)
    (mods / "modules.dep").write_text("kernel/drivers/vfio/pci/vfio-pci.ko: vfio-pci-core.ko\n")
    env = {k: v for k, v in os.environ.items()}
    code, out, err = cli("doctor")
    assert code == 9, out + err
    assert "[ok   ] iommu: IOMMU enabled (dmar0); command line: intel_iommu=on" in out
    assert "interrupt remapping is active" in out
    assert f"ids=1b36:0010 in /etc/modprobe.d/vfio.conf line 1 hands every drive with that id" \
           f" to vfio-pci at boot: {A}, {B}" in out
    assert "--enable-snippets local" in out
    assert "VM 100 has hookscript local:snippets/pvehook-hook, which is missing" in out
    assert "problem(s) found" in err and err.count("\n") == 1
    findings = json.loads(cli("doctor", "--json")[1])
    assert {f["check"] for f in findings if f["status"] == "error"} == {
        "vfio-ids", "hook", "registered"}
    assert "vfio-pci is available for kernel 6.14.8-2-pve" in out
    assert env == dict(os.environ)


def test_doctor_iommu_off(tmp_path, monkeypatch, cli):
    from fakesys import FakeHost

    host = FakeHost(tmp_path / "r", iommu=False)
    monkeypatch.setenv("PVEHOOK_ROOT", str(host.base))
    (host.base / "proc/cpuinfo").write_text("vendor_id\t: GenuineIntel\n")
    findings = json.loads(cli("doctor", "--json")[1])
    iommu = next(f for f in findings if f["check"] == "iommu")
    assert iommu["status"] == "error" and "intel_iommu=on" in iommu["fix"]
    code, out, _ = cli("iommu")
    assert code == 0 and "the IOMMU is off" in out


def test_help_version_and_module_entry(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for text in ("Exit codes:", "pvehook register 100", "_PVEHOOK_COMPLETE=bash_source"):
        assert text in out
    code, out, _ = cli("--version")
    assert (code, out) == (0, "pvehook 0.1.0\n")
    code, out, _ = cli("register", "--help")
    assert code == 0 and "--enable-snippets" in out and "Examples:" in out
    assert cli("nosuch")[0] == 2
    repo = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, "-m", "pvehook.cli", "--version"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(repo)}, cwd="/")
    assert (p.returncode, p.stdout) == (0, "pvehook 0.1.0\n")
    p = subprocess.run([sys.executable, "-m", "pvehook.cli"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(repo),
                                       "_PVEHOOK_COMPLETE": "bash_source"}, cwd="/")
    assert p.returncode == 0 and "complete" in p.stdout


def test_hook_never_imports_proxmoxer_and_status_needs_no_api(node, cli, monkeypatch, tmp_path):
    repo = Path(__file__).resolve().parents[2]
    code = ("import sys, pvehook.hook, pvehook.cli;"
            "assert 'proxmoxer' not in sys.modules, 'proxmoxer imported'")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(repo)},
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    monkeypatch.setenv("PATH", str(tmp_path))  # no pvesh, no pvesm
    two_nvme(node)
    assert cli("status")[0] == 0 and cli("iommu")[0] == 0


def test_a_permission_error_is_not_root_only_when_not_root(node, cli, monkeypatch):
    """As root, EACCES comes from elsewhere (an LSM, a read-only pmxcfs): say what was
    refused, exit 1; only a user who is not root is told to become root (exit 4)."""
    node.vm_config(100, "hostpci0: 01:00.0\n")
    path = node.root.pve("qemu-server", "100.conf")

    def refused(*_a, **_k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("pvehook.vmconfig.VmConfig.load", refused)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    code, _out, err = cli("check", 100)
    assert code == 1 and f"permission denied: {path}" in err and "as root" not in err
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    code, _out, err = cli("check", 100)
    assert code == 4 and "run pvehook as root" in err
