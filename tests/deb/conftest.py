"""tests/deb: the installed Debian package, in the real-kernel harness's trixie guest.

The fixtures and the cache setup are those of tests/vm (conftest loaded under another
name); every test here is a `vm` test too (PVEHOOK_SKIP_VM=1 skips them). The package comes
from $PVEHOOK_DEB, else dist/deb/pvehook_*_all.deb (tests/deb/build.sh, which tests/run
calls); without one the tests fail and say how to build it.
"""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
VM = HERE.parent / "vm"
REPO = HERE.parent.parent
if str(VM) not in sys.path:
    sys.path.insert(0, str(VM))

_spec = importlib.util.spec_from_file_location("pvehook_tests_vm_conftest", VM / "conftest.py")
_vm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_vm)
vm_cache = _vm.vm_cache
vm_workdir = _vm.vm_workdir

def pytest_collection_modifyitems(config, items):
    _vm.mark_vm(items, HERE)


@pytest.fixture(scope="session")
def deb() -> Path:
    """The .deb under test."""
    if os.environ.get("PVEHOOK_DEB"):
        p = Path(os.environ["PVEHOOK_DEB"])
        if not p.is_file():
            pytest.fail(f"PVEHOOK_DEB={p}: no such file", pytrace=False)
        return p
    found = sorted((REPO / "dist" / "deb").glob("pvehook_*_all.deb"))
    if not found:
        pytest.fail("no package to test: run `bash tests/deb/build.sh` (tests/run does) "
                    "or set PVEHOOK_DEB", pytrace=False)
    return found[-1]
