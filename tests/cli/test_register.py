"""register / unregister / list against the stand-in pvesh, through real proxmoxer."""

from __future__ import annotations

import os
import stat

from pvehook.cli.configs import SNIPPET_BODY
from pvehook.paths import HOOK_PATH

VOL = "local:snippets/pvehook-hook"
SNIPPETS = """\
dir: local
\tpath /var/lib/vz
\tcontent iso,vztmpl,backup,snippets

lvmthin: local-lvm
\tthinpool data
\tvgname pve
\tcontent rootdir,images
"""


def test_no_snippets_storage_says_how_and_changes_nothing(cluster, cli):
    cluster.vm(100)
    code, out, err = cli("register", 100)
    assert code == 7
    assert err.count("\n") == 1
    assert "pvehook register 100 --enable-snippets local" in err
    assert "pvesm set local --content iso,vztmpl,backup,snippets" in err
    assert "hookscript" not in cluster.conf(100)
    assert cluster.writes() == []
    assert not cluster.path("/var/lib/vz/snippets/pvehook-hook").exists()


def test_enable_snippets_and_register(cluster, cli):
    cluster.vm(100)
    code, out, err = cli("register", 100, "--enable-snippets", "local")
    assert code == 0, err
    cfg = (cluster.pve / "storage.cfg").read_text()
    content = next(line for line in cfg.splitlines() if "content" in line and "iso" in line)
    assert set(content.split()[1].split(",")) == {"iso", "vztmpl", "backup", "snippets"}
    snippet = cluster.path("/var/lib/vz/snippets/pvehook-hook")
    assert snippet.read_text() == SNIPPET_BODY == f'#!/bin/sh\nexec {HOOK_PATH} "$@"\n'
    assert stat.S_IMODE(snippet.stat().st_mode) == 0o755
    assert f"hookscript: {VOL}" in cluster.conf(100)
    assert "VM 100 on pve1: registered" in out
    assert not [p for p in snippet.parent.iterdir() if p.name.startswith(".")]  # no temp left

    code, out, err = cli("register", 100)
    assert code == 0, err
    assert "up to date" in out and "VM 100 on pve1: unchanged" in out
    assert cluster.conf(100).count("hookscript") == 1


def test_path_comes_from_pvesm_not_assumed(cluster, cli):
    cluster.storage(SNIPPETS + "\ndir: hooks\n\tpath /srv/hooks\n\tcontent snippets\n"
                    "\tcontent-dirs snippets=custom/snip\n")
    cluster.vm(100)
    code, out, err = cli("register", 100, "--storage", "hooks")
    assert code == 0, err
    assert cluster.path("/srv/hooks/custom/snip/pvehook-hook").is_file()
    assert "hookscript: hooks:snippets/pvehook-hook" in cluster.conf(100)


def test_other_hookscript_needs_force(cluster, cli):
    cluster.storage(SNIPPETS)
    cluster.vm(100, "memory: 512\nhookscript: local:snippets/mine.sh\n")
    code, out, err = cli("register", 100)
    assert code == 8
    assert "local:snippets/mine.sh" in err and "--force" in err
    assert cluster.writes() == []
    assert not cluster.path("/var/lib/vz/snippets/pvehook-hook").exists()

    code, out, err = cli("register", 100, "--force")
    assert code == 0, err
    assert "was local:snippets/mine.sh" in out
    assert f"hookscript: {VOL}" in cluster.conf(100)


def test_bad_input(cluster, cli):
    cluster.storage(SNIPPETS)
    cluster.vm(100)
    code, _, err = cli("register", 999)
    assert code == 6 and "VM 999 does not exist" in err
    code, _, err = cli("register", 100, "--storage", "local-lvm")
    assert code == 7 and "not a directory storage" in err and "lvmthin" in err
    code, _, err = cli("register", 100, "--storage", "nosuch")
    assert code == 7 and "storage 'nosuch' does not exist" in err
    code, _, err = cli("register")
    assert code == 2
    code, _, err = cli("register", "abc")
    assert code == 2
    assert cluster.writes() == []
    assert "hookscript" not in cluster.conf(100)


def test_not_root(cluster, cli, monkeypatch):
    cluster.storage(SNIPPETS)
    cluster.vm(100)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code, _, err = cli("register", 100)
    assert code == 4 and "root" in err and err.count("\n") == 1
    assert cluster.calls() == []


def test_pvesh_refuses_non_root(cluster, cli, monkeypatch):
    cluster.storage(SNIPPETS)
    cluster.vm(100)
    monkeypatch.setenv("PVESH_FAKE_NONROOT", "1")
    code, _, err = cli("register", 100)
    assert code == 1
    assert "please run as root" in err and err.count("\n") == 1


def test_not_a_proxmox_node(cluster, cli, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = cli("register", 100)
    assert code == 5 and "pvesh" in err


def test_locked_vm_reports_what_was_done(cluster, cli):
    cluster.storage(SNIPPETS)
    cluster.vm(100)
    cluster.vm(101, "memory: 512\nlock: backup\n")
    code, out, err = cli("register", 100, 101)
    assert code == 1
    assert "VM 100 on pve1: registered" in out
    assert "VM is locked (backup)" in err
    assert "the snippet" in err and "was written" in err and "VM 100 registered" in err
    assert err.count("\n") == 1
    assert "hookscript" in cluster.conf(100) and "hookscript" not in cluster.conf(101)


def test_vm_on_other_node(cluster, cli):
    cluster.storage(SNIPPETS)
    cluster.vm(200, node="pve2")
    # local storage is per node: pve2 has no snippet yet, and Proxmox checks it there
    code, out, err = cli("register", 200)
    assert code == 1
    assert "400" in err and "script 'local:snippets/pvehook-hook' does not exist" in err
    assert "no VM was registered" in err
    assert "hookscript" not in cluster.conf(200, "pve2")

    remote = cluster.path("/var/lib/vz/snippets/pvehook-hook", "pve2")
    remote.parent.mkdir(parents=True)
    remote.write_text(SNIPPET_BODY)
    remote.chmod(0o755)
    code, out, err = cli("register", 200)
    assert code == 0, err
    assert "VM 200 on pve2: registered" in out
    assert f"hookscript: {VOL}" in cluster.conf(200, "pve2")


def test_shared_storage_serves_every_node(cluster, cli):
    cluster.storage(SNIPPETS + "\nnfs: shared\n\tpath /mnt/pve/shared\n\tserver 10.0.0.1\n"
                    "\texport /x\n\tcontent snippets,images\n")
    cluster.vm(200, node="pve2")
    code, out, err = cli("register", 200, "--storage", "shared")
    assert code == 0, err
    assert "hookscript: shared:snippets/pvehook-hook" in cluster.conf(200, "pve2")


def test_warns_about_nodes_without_snippet(cluster, cli):
    cluster.storage(SNIPPETS)
    cluster.vm(100)
    cluster.vm(201, f"memory: 512\nhookscript: {VOL}\n", node="pve2")
    code, out, err = cli("register", 100)
    assert code == 0, err
    assert "warning: node pve2 has no local:snippets/pvehook-hook" in err
    assert "VM 201" in err


def test_unregister(cluster, cli):
    cluster.storage(SNIPPETS)
    cluster.vm(100)
    cluster.vm(101, "memory: 512\nhookscript: local:snippets/mine.sh\n")
    cluster.vm(102)
    assert cli("register", 100)[0] == 0
    code, out, err = cli("unregister", 100, 101, 102)
    assert code == 0, err
    assert "VM 100 on pve1: unregistered" in out
    assert "VM 101 on pve1: left alone" in out and "mine.sh" in err
    assert "VM 102 on pve1: not registered" in out
    assert "hookscript" not in cluster.conf(100)
    assert "hookscript: local:snippets/mine.sh" in cluster.conf(101)


def test_list(cluster, cli, host):
    import json

    from fakesys import FakeNamespace

    host.add_pci("0000:01:00.0", group=1, namespaces=[FakeNamespace()])
    host.add_pci("0000:03:00.0", cls=0x020000, group=3)
    cluster.storage(SNIPPETS)
    cluster.vm(100, "memory: 512\nhostpci0: 0000:01:00.0\nhostpci1: 03:00\n"
                    "scsi0: local-lvm:vm-100-disk-0,size=8G\nscsi1: local:100/x.qcow2\n")
    cluster.vm(101)
    assert cli("register", 100)[0] == 0
    code, out, err = cli("list")
    assert code == 0, err
    assert "VM 100 on pve1, stopped" in out and "VM 101" not in out
    assert "hostpci0: host=0000:01:00.0 -> 0000:01:00.0: NVMe" in out
    assert "hostpci1: host=03:00 -> 0000:03:00.0: not NVMe" in out
    assert "/dev/pve/vm-100-disk-0" in out and "x.qcow2" not in out
    code, out, _ = cli("list", "--json")
    data = json.loads(out)
    assert [(d["vmid"], d["node"]) for d in data] == [(100, "pve1")]
    assert [d["managed"] for d in data[0]["devices"]] == [True, False]
    assert data[0]["lvm_disks"][0]["lv"] == "/dev/pve/vm-100-disk-0"


def test_register_json(cluster, cli):
    import json

    cluster.storage(SNIPPETS)
    cluster.vm(100)
    code, out, _ = cli("register", 100, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["storage"] == "local" and data["snippet_written"] is True
    assert data["vms"] == [{"vmid": 100, "node": "pve1", "action": "registered", "old": None}]
