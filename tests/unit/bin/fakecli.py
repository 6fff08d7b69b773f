"""`pvehook` (the CLI) in its own process against the fake tree in PVEHOOK_ROOT, with
tests/fakesys.py's fake kernel performing the sysfs writes, as benchmarks/_fakehook.py
does for the hook."""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import pvehook.context  # noqa: E402
from fakesys import FakeHost, FakeKernel  # noqa: E402
from pvehook.cli import main  # noqa: E402

host = FakeHost.reopen(os.environ["PVEHOOK_ROOT"])
pvehook.context.Kernel = lambda: FakeKernel(host)
main(sys.argv[1:])
