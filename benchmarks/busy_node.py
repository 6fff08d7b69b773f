"""Item 4: `pvehook status` and `pvehook check` on a busy node.

    python3 benchmarks/busy_node.py [--python PY] [--repeat N] [--vms 50]

A fake node (tests/fakesys.py tree in /dev/shm, PVEHOOK_ROOT) with C NVMe controllers
(C = 4, 16, 64; each alone in its IOMMU group, one namespace with two partitions, on
nvme) and --vms VM configs (with a snapshot section each); VM 100+i passes controller i
(for i < C), the others have none. Every run is a fresh `python3 -m pvehook.cli`
process; medians of wall and CPU time. `--version` is the CLI's fixed cost (interpreter,
click); `check 100` is the dry run of pre-start for one VM with one controller.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_env, fake_node, footer, header, med, ms, round_robin  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--vms", type=int, default=50)
    args = ap.parse_args()
    py = args.python
    state = header(f"busy node: pvehook status / check with {args.vms} VM configs", py)
    cli = [py, "-m", "pvehook.cli"]
    cases = [("python3 -c pass", [py, "-c", "pass"], 0),
             ("pvehook --version", cli + ["--version"], 0),
             ("pvehook status", cli + ["status"], 0),
             ("pvehook status --json", cli + ["status", "--json"], 0),
             ("pvehook check 100", cli + ["check", "100"], 0)]
    tmp = Path(tempfile.mkdtemp(prefix="pvehook-bench-", dir="/dev/shm"))
    results = {}
    try:
        for c in (4, 16, 64):
            tree = tmp / f"c{c}"
            fake_node(tree, c, vms=args.vms,
                      vm_devices={100 + i: [i] for i in range(min(c, args.vms))})
            env = base_env(PVEHOOK_ROOT=str(tree))
            samples = round_robin(cases, env, args.repeat)
            results[c] = {n: (med(s.wall for s in ss), med(s.cpu for s in ss))
                          for n, ss in samples.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nwall / cpu in ms, medians of {args.repeat} runs each, round-robin")
    print(f"{'controllers':24}" + "".join(f"{c:>16}" for c in results))
    for name, _, _ in cases:
        print(f"{name:24}" + "".join(f"{ms(results[c][name][0]):>8}/{ms(results[c][name][1]):>7}"
                                     for c in results))
    print("\nbeyond `pvehook --version`, ms (wall | cpu): 4 -> 16 -> 64 controllers")
    for name in ("pvehook status", "pvehook check 100"):
        line = f"{name:24}"
        for i, what in ((0, "wall"), (1, "cpu")):
            extra = [results[c][name][i] - results[c]["pvehook --version"][i] for c in results]
            line += (" -> ".join(ms(x) for x in extra)
                     + f" ({(extra[2] - extra[0]) / 60 * 1000:.2f}/controller)" + (" | " if not i else ""))
        print(line)
    footer(state)


if __name__ == "__main__":
    main()
