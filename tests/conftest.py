"""Fixtures shared by the fast tests: a fake host tree and a hook run against it."""

from __future__ import annotations

import pytest

from fakesys import FakeHost, FakeKernel, FakeLater
from pvehook.context import Context, Timeouts


@pytest.fixture
def host(tmp_path):
    return FakeHost(tmp_path / "root")


@pytest.fixture
def ctx(host):
    return Context(root=host.root, kernel=FakeKernel(host), node="pve1",
                   timeouts=Timeouts(rebind=5, vfio_release=5, namespaces=5, lock=5),
                   later=FakeLater())


@pytest.fixture
def hook(ctx, capsys):
    """Run the hook in-process: hook(vmid, phase) -> (exit code, output)."""
    from pvehook.hook import run

    def call(vmid, phase, context=None):
        code = run([str(vmid), phase], context or ctx)
        out = capsys.readouterr()
        return code, out.out + out.err

    return call

