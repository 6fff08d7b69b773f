"""Run the hook in its own process against a fake tree, with tests/fakesys.py's fake
kernel performing the sysfs writes (the hook script itself would use the real kernel).

    python3 benchmarks/_fakehook.py TREE VMID PHASE
    python3 benchmarks/_fakehook.py TREE --imports-only   (the driver's own import cost)

Its cost over hooks/pvehook-hook is importing fakesys (json, fcntl, shutil, contextlib,
which the hook mostly imports anyway) and building the fake host object.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fakesys import FakeHost, FakeKernel  # noqa: E402

if sys.argv[2] == "--imports-only":
    sys.exit(0)

host = FakeHost.reopen(sys.argv[1])

from pvehook.context import Context  # noqa: E402
from pvehook.hook import run  # noqa: E402

sys.exit(run(sys.argv[2:], Context(root=host.root, kernel=FakeKernel(host))))
