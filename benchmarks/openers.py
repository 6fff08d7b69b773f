"""Issue 12 item 2: pre-start's scan of every process's open files, on a busy node.

    python3 benchmarks/openers.py [--python PY] [--repeat N] [--procs 500] [--fds 40]

Real processes on this machine: --procs `sleep` processes (started through bash, which
opens --fds files each and execs sleep: 500 x 40 = 20,000 open files), in two flavours:

  shm   the files are in /dev/shm (skipped by name, as /dev/pts, /dev/mqueue...: one
        readlink per fd)
  dev   the files are in a directory of /dev itself (not skipped: one readlink and one
        stat per fd, the scan's worst case)

The hook runs against a fake node (tests/fakesys.py tree in /dev/shm, PVEHOOK_ROOT: one
NVMe whose partition is mounted, so pre-start runs every check and refuses with exit 11
before any write). Its /proc is a directory of links to the real /proc/<pid> of the
processes the case includes (plus a fake self/mountinfo and swaps), so the hook reads
the real open files of real processes:

  idle     the machine's own processes only
  +shm     and the shm holders
  +dev     and the dev holders

Every run is a fresh hook process, round-robin over the cases; medians of wall and CPU
time (as benchmarks/_common.py). `scan only` is Openers' /proc scan alone, in this
process (median of the same number of runs). Figures only, no assertions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, base_env, fake_node, footer, header, med, ms,  # noqa: E402
                     nvme_addr, round_robin)

HOOK = str(REPO / "hooks" / "pvehook-hook")


def holders(n: int, fds: int, where: Path) -> list[subprocess.Popen]:
    """n sleeping processes, each holding `fds` files of `where` open."""
    where.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(fds):
        f = where / f"f{i}"
        f.write_bytes(b"x")
        files.append(f)
    redirs = " ".join(f"{10 + i}<{f}" for i, f in enumerate(files))
    script = f"exec {redirs}; exec sleep 100000"
    procs = [subprocess.Popen(["bash", "-c", script], stdin=subprocess.DEVNULL)
             for _ in range(n)]
    # Ready when each has exec'ed sleep with its files open.
    deadline = time.monotonic() + 120
    for p in procs:
        while True:
            try:
                if (Path(f"/proc/{p.pid}/comm").read_text().strip() == "sleep"
                        and len(os.listdir(f"/proc/{p.pid}/fd")) >= fds):
                    break
            except OSError:
                pass
            if p.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"holder {p.pid} did not come up")
            time.sleep(0.01)
    return procs


def link_proc(tree: Path, pids: list[int]) -> None:
    """tree/proc/<pid> -> /proc/<pid> for each pid; self/mountinfo and swaps stay fake,
    self/ns/mnt reads as the real one (the processes are in the hook's mount namespace)."""
    for pid in pids:
        (tree / "proc" / str(pid)).symlink_to(f"/proc/{pid}")
    (tree / "proc/self/ns").mkdir()
    (tree / "proc/self/ns/mnt").symlink_to(os.readlink("/proc/self/ns/mnt"))


def count_fds(pids: list[int]) -> int:
    n = 0
    for pid in pids:
        try:
            n += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return n


def scan_time(tree: Path, repeat: int) -> float:
    from pvehook.openers import Openers
    from pvehook.paths import Root

    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        Openers(Root(tree)).pids("nvme0n1", None)
        times.append(time.perf_counter() - t0)
    return med(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--procs", type=int, default=500)
    ap.add_argument("--fds", type=int, default=40)
    args = ap.parse_args()
    py = args.python
    state = header(f"openers: pre-start with {args.procs} processes x {args.fds} open files", py)
    tmp = Path(tempfile.mkdtemp(prefix="pvehook-bench-", dir="/dev/shm"))
    devdir = Path(tempfile.mkdtemp(prefix="pvehook-bench-", dir="/dev"))
    procs: list[subprocess.Popen] = []
    try:
        machine = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        shm = holders(args.procs, args.fds, tmp / "shm-files")
        dev = holders(args.procs, args.fds, devdir)
        procs = shm + dev
        trees = {"idle": machine, "+shm": machine + [p.pid for p in shm],
                 "+dev": machine + [p.pid for p in dev]}
        for name, pids in trees.items():
            tree = tmp / name
            host = fake_node(tree, 1, vms=1, vm_devices={100: [0]})
            disk = next(n for n in host.namespaces_of(nvme_addr(0)) if "p" not in n[5:])
            host.mount(disk + "p1", "/srv/data")
            link_proc(tree, pids)
        cases = [("python3 -c pass", [py, "-c", "pass"], 0)]
        for name in trees:
            cases.append((name, ["env", f"PVEHOOK_ROOT={tmp / name}", py, HOOK, "100",
                                 "pre-start"], 11))
        samples = round_robin(cases, base_env(), args.repeat)
        scans = {name: scan_time(tmp / name, args.repeat) for name in trees}
        print(f"\nmedians of {args.repeat} runs each, round-robin; ms")
        print(f"{'case':18} {'procs':>6} {'fds':>7} {'wall':>7} {'cpu':>7} {'+wall':>7}"
              f" {'+cpu':>7} {'scan only':>10}")
        base = samples["idle"]
        bw, bc = med(s.wall for s in base), med(s.cpu for s in base)
        for name, _, _ in cases:
            ss = samples[name]
            w, c = med(s.wall for s in ss), med(s.cpu for s in ss)
            if name in trees:
                pids = trees[name]
                extra = (f" {len(pids):>6} {count_fds(pids):>7} {ms(w):>7} {ms(c):>7}"
                         f" {ms(w - bw):>7} {ms(c - bc):>7} {ms(scans[name]):>10}")
            else:
                extra = f" {'':>6} {'':>7} {ms(w):>7} {ms(c):>7}"
            print(f"{name:18}{extra}")
        print("(+wall, +cpu: against `idle`, the same pre-start with the machine's own"
              " processes only)")
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(devdir, ignore_errors=True)
    footer(state)


if __name__ == "__main__":
    main()
