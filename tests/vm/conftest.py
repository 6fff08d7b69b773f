"""Real-kernel tests: boot trixie's kernel under QEMU (see harness.py).

Every test under tests/vm gets the ``vm`` marker. The session fixture builds or checks
the VM cache (tests/vm/setup.sh) once; if the harness cannot run (not root, setup
failed), the tests FAIL with the reason instead of being skipped silently. Set
PVEHOOK_SKIP_VM=1 to skip them on purpose (fast unit tests only).
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # so tests can `from harness import ...` in any import mode
    sys.path.insert(0, str(HERE))

SKIP = os.environ.get("PVEHOOK_SKIP_VM") == "1"


def mark_vm(items, here: Path) -> None:
    """Mark the tests under `here` as `vm` tests (skipped with PVEHOOK_SKIP_VM=1)."""
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.vm)
            if SKIP:
                item.add_marker(pytest.mark.skip(reason="PVEHOOK_SKIP_VM=1"))


def pytest_collection_modifyitems(config, items):
    mark_vm(items, HERE)


@pytest.fixture(scope="session", autouse=True)
def vm_cache():
    """Run setup.sh once per session (seconds when the cache is built); return the cache dir."""
    if SKIP:
        yield None
        return
    if os.geteuid() != 0:
        pytest.fail("tests/vm need root (setup.sh installs packages; the guest shares / over 9p). "
                    "Set PVEHOOK_SKIP_VM=1 to skip them.", pytrace=False)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(HERE / "setup.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"tests/vm/setup.sh failed (rc={proc.returncode}):\n"
                    f"{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}", pytrace=False)
    import harness  # after setup: PVEHOOK_VM_CACHE is read at import

    harness.SETUP_SECONDS = time.monotonic() - t0
    yield Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def vm_workdir(tmp_path):
    """A per-test work dir for run_guest(..., workdir=vm_workdir): console.log and
    results/ end up under pytest's tmp_path (kept for the last few runs)."""
    return tmp_path / "vm"
