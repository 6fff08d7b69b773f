"""Item 1: what one hook process costs, next to a bare interpreter, in one run.

    python3 benchmarks/startup.py [--python PY] [--repeat N]

Every case is a fresh process of the same interpreter with the same environment
(PYTHONPATH = the work tree), run round-robin N times; medians of wall time and CPU time
(user + sys of the process and its children, from wait4's rusage), and their ratio to
`python3 -c pass`. The fake tree (tests/fakesys.py) lives in /dev/shm, like /run and /sys.

Cases:
  stdlib floor               `python3 -c "import re, json, pathlib, fcntl"`: the standard
                             library no hook that parses configs and keeps a record can do
                             without; the best a Python hook can be
  post-start                 a phase with nothing to do (Proxmox runs it at every start)
  pre-start, no hostpci      a registered VM without devices: reads its config, nothing else
  pre-start, every check     one NVMe whose disk is mounted on the host: config, devices,
                             locks, IOMMU group, holds, namespaces, mounts/swaps/holders/udev,
                             the O_EXCL probe; refused (exit 11) before any write
  pre-start, stays           one NVMe already on vfio-pci: every check, the record written
  pre-start, moves (driver)  one NVMe moved nvme -> vfio-pci by the fake kernel: forked writer
                             children, record, verification. Run by benchmarks/_fakehook.py
                             (the hook's run() with FakeKernel), whose own import cost is
                             the "driver imports only" row
  post-stop, gives back      the same device back to nvme, namespaces waited for (driver)

Then `-X importtime`: every module the hook imports beyond a bare interpreter, per phase.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, base_env, fake_node, footer, header, med, ms, nvme_addr,  # noqa: E402
                     round_robin)

HOOK = str(REPO / "hooks" / "pvehook-hook")
FLOOR = "import re, json, pathlib, fcntl"
DRIVER = str(REPO / "benchmarks" / "_fakehook.py")


def build(base: Path):
    # VM 100: controller 0 (moves); 101: no hostpci; 102: controller 1, mounted;
    # 103: controller 2, already on vfio-pci.
    host = fake_node(base, 3, vms=4, vm_devices={100: [0], 102: [1], 103: [2]})
    disk = next(n for n in host.namespaces_of(nvme_addr(1)) if "p" not in n[5:])
    host.mount(disk, "/srv/data")
    host.detach(nvme_addr(2))
    host.attach(nvme_addr(2), "vfio-pci")
    return host


def importtime(py: str, argv: list[str], env: dict, runs: int = 5) -> dict[str, float]:
    """module -> median cumulative import time (s); " self <module>" -> its own time,
    without the modules it imports; " level <module>" -> its depth."""
    per: dict[str, list[float]] = {}
    for _ in range(runs):
        err = subprocess.run([py, "-X", "importtime", *argv], env=env, capture_output=True,
                             text=True, stdin=subprocess.DEVNULL).stderr
        for m in re.finditer(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$", err, re.M):
            per.setdefault(m[4], []).append(int(m[2]) / 1e6)
            per.setdefault(" self " + m[4], []).append(int(m[1]) / 1e6)
            per.setdefault(" level " + m[4], []).append(len(m[3]) // 2)
    return {k: med(v) for k, v in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    py = args.python
    state = header("startup: the hook process against `python3 -c pass`", py)

    tmp = Path(tempfile.mkdtemp(prefix="pvehook-bench-", dir="/dev/shm"))
    try:
        tree = tmp / "root"
        build(tree)
        env = base_env(PVEHOOK_ROOT=str(tree))
        cases = [
            ("python3 -c pass", [py, "-c", "pass"], 0),
            ("stdlib floor (re, json, pathlib, fcntl)", [py, "-c", FLOOR], 0),
            ("hook post-start (nothing to do)", [py, HOOK, "100", "post-start"], 0),
            ("hook pre-start, no hostpci", [py, HOOK, "101", "pre-start"], 0),
            ("hook pre-start, every check, refused", [py, HOOK, "102", "pre-start"], 11),
            ("hook pre-start, already on vfio-pci", [py, HOOK, "103", "pre-start"], 0),
            ("driver imports only", [py, DRIVER, str(tree), "--imports-only"], 0),
            ("driver: pre-start, moves 1 NVMe", [py, DRIVER, str(tree), "100", "pre-start"], 0),
            ("driver: post-stop, gives it back", [py, DRIVER, str(tree), "100", "post-stop"], 0),
        ]
        samples = round_robin(cases, env, args.repeat)

        base_wall = med(s.wall for s in samples["python3 -c pass"])
        base_cpu = med(s.cpu for s in samples["python3 -c pass"])
        print(f"\nmedians of {args.repeat} runs each, round-robin (ms; ratio = / python3 -c pass)")
        print(f"{'case':40} {'wall':>7} {'ratio':>6} {'cpu':>7} {'ratio':>6} {'user':>6} {'sys':>6}")
        for name, _, _ in cases:
            ss = samples[name]
            w, c = med(s.wall for s in ss), med(s.cpu for s in ss)
            print(f"{name:40} {ms(w):>7} {w / base_wall:>5.2f}x {ms(c):>7} {c / base_cpu:>5.2f}x"
                  f" {ms(med(s.user for s in ss)):>6} {ms(med(s.sys for s in ss)):>6}")
        d_imp = med(s.wall for s in samples["driver imports only"]) - base_wall
        print(f"driver's own extra over a bare start: {ms(d_imp)} ms wall (an upper bound of"
              " what the driver rows carry beyond the hook: the hook imports most of it too)")

        print("\n-X importtime (median of 5): modules beyond `python3 -c pass`, cumulative ms")
        bare = importtime(py, ["-c", "pass"], env)
        heavy = [k for k in bare if not k.startswith(" ") and bare[" level " + k] == 2
                 and k not in ("encodings", "os", "site", "codecs", "io", "abc", "stat")
                 and bare[k] > 0.002]
        print(f"the bare interpreter's `site` takes {ms(bare.get('site', 0))} ms"
              + (f"; it imports {', '.join(heavy)} (a .pth file?): that inflates the baseline,"
                 " measure with a clean venv's python as well" if heavy else ""))
        for label, argv in [("post-start", [HOOK, "100", "post-start"]),
                            ("pre-start, every check", [HOOK, "102", "pre-start"]),
                            ("pre-start, moves (driver)", [DRIVER, str(tree), "100", "pre-start"]),
                            ("post-stop, gives back (driver)", [DRIVER, str(tree), "100", "post-stop"])]:
            t = importtime(py, argv, env)
            extra = {k: v for k, v in t.items() if not k.startswith(" ") and k not in bare}
            top = {k: v for k, v in extra.items() if t[" level " + k] == 1}
            total = sum(top.values())
            print(f"-- {label}: {len(extra)} modules, {ms(total)} ms in top-level imports")
            own = {k: t[" self " + k] for k in extra}
            ours = sum(v for k, v in own.items() if k.startswith("pvehook"))
            print(f"   own time (without what they import): pvehook.* {ms(ours)} ms,"
                  f" everything else {ms(sum(own.values()) - ours)} ms; the largest: "
                  + ", ".join(f"{k} {ms(v)}" for k, v in sorted(own.items(),
                                                             key=lambda kv: -kv[1])[:8]))
            names = sorted(extra, key=lambda k: -extra[k])
            for k in names:
                if t[" level " + k] <= 2:
                    print(f"   {'  ' * (int(t[' level ' + k]) - 1)}{k:34} {ms(extra[k]):>6}")
            print("   all: " + " ".join(sorted(extra)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    footer(state)


if __name__ == "__main__":
    main()
