"""Fixtures of the CLI tests: a cluster tree over the fake host, the stand-in pvesh on
PATH, and the CLI run in-process (real click, real proxmoxer, real subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

BIN = Path(__file__).parent / "bin"

STORAGE_CFG = """\
dir: local
\tpath /var/lib/vz
\tcontent iso,vztmpl,backup

lvmthin: local-lvm
\tthinpool data
\tvgname pve
\tcontent rootdir,images
"""


class Cluster:
    """/etc/pve as on a node of a cluster: nodes/<node>/qemu-server/<vmid>.conf, with
    /etc/pve/local -> nodes/<local node> and /etc/pve/qemu-server -> local/qemu-server."""

    def __init__(self, host, local="pve1", others=("pve2",)):
        self.host = host
        self.root = host.root
        self.pve = host.root.pve()
        self.local = local
        for n in (local, *others):
            (self.pve / "nodes" / n / "qemu-server").mkdir(parents=True, exist_ok=True)
        qs = self.pve / "qemu-server"
        for f in qs.iterdir() if qs.is_dir() and not qs.is_symlink() else []:
            f.rename(self.pve / "nodes" / local / "qemu-server" / f.name)
        if qs.is_dir() and not qs.is_symlink():
            qs.rmdir()
        (self.pve / "local").symlink_to(f"nodes/{local}")
        qs.symlink_to(f"nodes/{local}/qemu-server")
        self.storage(STORAGE_CFG)
        self.log = host.base / "pvesh.log"

    def storage(self, text: str) -> None:
        (self.pve / "storage.cfg").write_text(text)

    def vm(self, vmid: int, text: str = "memory: 2048\n", node: str | None = None) -> Path:
        p = self.pve / "nodes" / (node or self.local) / "qemu-server" / f"{vmid}.conf"
        p.write_text(text)
        return p

    def conf(self, vmid: int, node: str | None = None) -> str:
        return (self.pve / "nodes" / (node or self.local) / "qemu-server" / f"{vmid}.conf").read_text()

    def path(self, absolute: str, node: str | None = None) -> Path:
        """A file of node `node`'s own (non-shared) storage, as the stand-in keeps it."""
        top = self.host.base if node in (None, self.local) else self.host.base / "fakenodes" / node
        return top / absolute.lstrip("/")

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def writes(self) -> list[list[str]]:
        return [c for c in self.calls() if c[0] == "pvesh" and c[1] in ("set", "create", "delete")]


@pytest.fixture
def cluster(host, monkeypatch):
    c = Cluster(host)
    monkeypatch.setenv("PVEHOOK_ROOT", str(host.base))
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PVESH_LOG", str(c.log))
    monkeypatch.delenv("PVESH_FAKE_NONROOT", raising=False)
    assert shutil.which("pvesh") == str(BIN / "pvesh")
    return c


@pytest.fixture
def node(host, monkeypatch):
    """A lone node without the stand-in: for the commands that need no API."""
    monkeypatch.setenv("PVEHOOK_ROOT", str(host.base))
    return host


@pytest.fixture
def cli():
    """cli("register", "100") -> (exit code, stdout, stderr), run in-process through
    click's CliRunner, as the console script runs it (errors become exit codes in the
    group, commands end with ctx.exit)."""
    from click.testing import CliRunner

    from pvehook.cli import cli as group

    try:
        runner = CliRunner(mix_stderr=False)  # click 8.1 (trixie)
    except TypeError:  # click 8.2 keeps stderr apart always
        runner = CliRunner()

    def call(*args):
        res = runner.invoke(group, [str(a) for a in args], prog_name="pvehook", env=None)
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception  # a bug: show its traceback, not an exit code
        return res.exit_code, res.stdout, res.stderr

    return call
