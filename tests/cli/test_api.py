"""The stand-in's error shapes, and what real proxmoxer makes of them (pvehook.cli.api.Pve)."""

from __future__ import annotations

import subprocess

import pytest

from pvehook.cli.api import Pve, Vm
from pvehook.errors import ApiError


def pvesh(*args):
    p = subprocess.run(["pvesh", *args, "--output-format", "json"], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def test_shapes_of_the_stand_in(cluster):
    cluster.vm(100)
    code, out, err = pvesh("get", "/nodes/pve1/qemu/999/config")
    assert (code, out) == (255, "")
    assert err == "Configuration file 'nodes/pve1/qemu-server/999.conf' does not exist\n"
    code, out, err = pvesh("set", "/nodes/pve1/qemu/100/config", "-hookscript", "local:snippets/x")
    assert code == 255
    assert err == ("400 Parameter verification failed.\n"
                   "hookscript: script 'local:snippets/x' does not exist\n")
    snip = cluster.path("/var/lib/vz/snippets/x")
    snip.parent.mkdir(parents=True)
    snip.write_text("#!/bin/sh\n")
    code, _, err = pvesh("set", "/nodes/pve1/qemu/100/config", "-hookscript", "local:snippets/x")
    assert "hookscript: script 'local:snippets/x' is not executable" in err
    code, _, err = pvesh("set", "/nodes/pve1/qemu/100/config", "-hookscript", "local:iso/x.iso")
    assert "hookscript: 'local:iso/x.iso' is not in the snippets directory" in err
    code, _, err = pvesh("set", "/nodes/pve1/qemu/100/config", "-bogus", "1")
    assert err.startswith("400 Parameter verification failed.\nbogus: property is not defined")
    code, _, err = pvesh("get", "/nope")
    assert (code, err) == (255, "no 'get' handler for '/nope'\n")
    snip.chmod(0o755)
    code, out, err = pvesh("set", "/nodes/pve1/qemu/100/config", "-hookscript", "local:snippets/x")
    assert (code, out, err) == (0, "", "")
    assert "hookscript: local:snippets/x" in cluster.conf(100)


def test_proxmoxer_turns_them_into_api_errors(cluster):
    cluster.vm(100)
    pve = Pve()
    with pytest.raises(ApiError) as e:
        pve.vm_config(Vm(999, "pve1", "qemu"))
    # no status on stderr: proxmoxer says 500
    assert e.value.status == 500
    assert str(e.value) == ("Proxmox refused GET /nodes/pve1/qemu/999/config: 500 Internal Server"
                            " Error: Configuration file 'nodes/pve1/qemu-server/999.conf' does"
                            " not exist")
    with pytest.raises(ApiError) as e:
        pve.set_hookscript(Vm(100, "pve1", "qemu"), "local:snippets/x")
    assert e.value.status == 400
    assert "400 Bad Request: Parameter verification failed. hookscript: script" in str(e.value)
    assert pve.vms()[100].node == "pve1"
    assert [s.id for s in pve.storages()] == ["local", "local-lvm"]


def test_checksum_guards_against_concurrent_edits(cluster):
    cluster.vm(100)
    snip = cluster.path("/var/lib/vz/snippets/pvehook-hook")
    snip.parent.mkdir(parents=True)
    snip.write_text("#!/bin/sh\n")
    snip.chmod(0o755)
    pve = Pve()
    vm = Vm(100, "pve1", "qemu")
    digest = pve.vm_config(vm)["digest"]
    cluster.vm(100, "memory: 4096\n")  # someone else edits it meanwhile
    with pytest.raises(ApiError, match="checksum mismatch"):
        pve.set_hookscript(vm, "local:snippets/pvehook-hook", digest)
