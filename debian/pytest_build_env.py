"""pytest plugin for the package build (debian/rules: -p pytest_build_env).

tests/cli drive the CLI through the real proxmoxer's `local` backend (proxmoxer >= 1.3,
Debian trixie's python3-proxmoxer 2.2.0). Debian bookworm ships proxmoxer 1.2.0, which has
no such backend, so on a bookworm build system the tests that talk to the stand-in pvesh
(those using the `cluster` fixture) are skipped with that reason; the others run.
The same tests are skipped when the build does not run as root (register refuses). On a
trixie build system nothing is skipped. All of tests/cli run against the installed package
on trixie in tests/deb (and in the autopkgtest), so nothing goes untested.
"""

from __future__ import annotations

import importlib.util
import os

import pytest


def _local_backend() -> str | None:
    """None if proxmoxer has the local backend, else why not."""
    try:
        import proxmoxer
    except ImportError:
        return "python3-proxmoxer is not installed"
    if importlib.util.find_spec("proxmoxer.backends.local") is None:
        version = getattr(proxmoxer, "__version__", "?")
        return (f"proxmoxer {version} has no 'local' backend (needs >= 1.3: Debian trixie's "
                "python3-proxmoxer; bookworm has 1.2.0)")
    return None


def pytest_collection_modifyitems(config, items):
    why = _local_backend()
    if why is None and os.geteuid() != 0:
        # register/unregister refuse to run unless root (only root@pam may set a
        # hookscript); a build as a normal user (Rules-Requires-Root: no) cannot run them.
        why = "pvehook register/unregister need root and this build is not root"
    if why is None:
        return
    skip = pytest.mark.skip(reason=f"drives the real proxmoxer: {why}")
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


def pytest_report_header(config):
    why = _local_backend()
    return f"proxmoxer local backend: {'yes' if why is None else 'no: ' + why}"
