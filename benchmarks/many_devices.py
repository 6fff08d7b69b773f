"""Item 3: a VM with many NVMe controllers whose drives take long to shut down.

    python3 benchmarks/many_devices.py [--python PY] [--delay S] [--repeat N]
    python3 benchmarks/many_devices.py --guest [--iops N] [--inflight K]

Fake kernel (default): N = 1, 2, 4, 8 controllers, every unbind takes --delay seconds
(FakeHost.fault(addr, "unbind", "delay", s): nvme shutting a drive down at pre-start,
vfio-pci letting go at post-stop). Wall time of the hook process (benchmarks/_fakehook.py:
the hook's run() with the fake kernel) for pre-start and post-stop, next to the same
moves done one device after another (rebind.move called per device, in-process), and to
N x delay. Concurrent: ~1 delay whatever N; one after another: N delays.

--guest: the real kernel (tests/vm, TCG) with 8 isolated NVMe controllers, each drive
throttled to --iops and kept busy with --inflight direct reads (dd) when pre-start
runs, so nvme's unbind waits for the I/O to drain, like a slow drive. Timed with
/usr/bin/time: a shell moving them one after another, a shell moving them all at once
(subshells), and the hook; then post-stop against a shell giving all back at once.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, base_env, fake_node, footer, header, med, nvme_addr,  # noqa: E402
                     run)

DRIVER = str(REPO / "benchmarks" / "_fakehook.py")


def sequential(tree: Path, n: int, target: str | None) -> float:
    """Move the n controllers one after another, in this process (no hook run)."""
    from fakesys import FakeHost, FakeKernel
    from pvehook import rebind
    from pvehook.pci import PciAddress, PciDevice

    host = FakeHost.reopen(tree)
    kernel = FakeKernel(host)
    t0 = time.perf_counter()
    for i in range(n):
        dev = PciDevice(host.root, PciAddress.parse(nvme_addr(i)))
        errors = rebind.move(kernel, [(dev, target)], keep_override=target is not None)
        if errors:
            raise SystemExit(f"sequential move failed: {errors}")
    return time.perf_counter() - t0


def fake(args) -> None:
    state = header(f"many devices, fake kernel, {args.delay:g} s per unbind", args.python)
    print(f"\n{'N':>3} {'hook pre-start':>15} {'hook post-stop':>15} {'one after another':>18}"
          f" {'N x delay':>10}   (s, medians of {args.repeat})")
    tmp = Path(tempfile.mkdtemp(prefix="pvehook-bench-", dir="/dev/shm"))
    try:
        for n in (1, 2, 4, 8):
            tree = tmp / f"n{n}"
            fake_node(tree, n, vms=1, vm_devices={100: list(range(n))}, delay=args.delay)
            env = base_env(PVEHOOK_ROOT=str(tree))
            pre, post, seq = [], [], []
            for _ in range(args.repeat):
                for phase, out in (("pre-start", pre), ("post-stop", post)):
                    s = run([args.python, DRIVER, str(tree), "100", phase], env)
                    if s.rc != 0:
                        p = subprocess.run([args.python, DRIVER, str(tree), "100", phase],
                                           env=env, capture_output=True, text=True)
                        raise SystemExit(f"{phase} N={n}: exit {s.rc}\n{p.stdout}{p.stderr}")
                    out.append(s.wall)
            seq.append(sequential(tree, n, "vfio-pci"))
            sequential(tree, n, "nvme")  # back, for the next N
            print(f"{n:>3} {med(pre):>15.2f} {med(post):>15.2f} {med(seq):>18.2f}"
                  f" {n * args.delay:>10.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    footer(state)


GUEST_SCRIPT = r"""
BDFS=$(jq -r '.[] | select(.kind == "nvme") | .bdf' /results/topology.json)
{ echo 'machine: q35'; i=0; for b in $BDFS; do printf 'hostpci%d: %s,pcie=1\n' $i "${b#0000:}"; i=$((i+1)); done; } \
    > /etc/pve/qemu-server/100.conf
cat > /tmp/seq_pre.sh <<'SH'
for b in "$@"; do
  d=/sys/bus/pci/devices/$b
  echo vfio-pci > $d/driver_override; echo $b > $d/driver/unbind; echo $b > /sys/bus/pci/drivers_probe
done
SH
cat > /tmp/par_pre.sh <<'SH'
for b in "$@"; do
  ( d=/sys/bus/pci/devices/$b
    echo vfio-pci > $d/driver_override; echo $b > $d/driver/unbind; echo $b > /sys/bus/pci/drivers_probe ) &
done
wait
SH
# busy BDF...: K direct reads in flight on each one's namespace; they end when it goes away.
busy() {
  for b in "$@"; do
    for n in /sys/bus/pci/devices/$b/nvme/nvme*/nvme*n1; do
      for k in $(seq 1 $INFLIGHT); do
        dd if=/dev/$(basename $n) of=/dev/null bs=4k count=1000000 skip=$((k * 1000)) iflag=direct status=none 2>/dev/null &
      done
    done
  done
  sleep 1
}
check_all() { for b in $BDFS; do [ "$(vm_driver $b)" = "$1" ] || echo "WRONG $b $(vm_driver $b)"; done; }
# calibration: one device alone, with I/O in flight
first=$(echo $BDFS | cut -d' ' -f1)
busy $first; timed one_bare_pre sh /tmp/seq_pre.sh $first; wait
timed one_back sh /tmp/bare_post.sh $first
for i in $(seq 1 $REPEAT); do
  busy $BDFS; timed seq_pre sh /tmp/seq_pre.sh $BDFS; wait; check_all vfio-pci
  timed bare_post sh /tmp/bare_post.sh $BDFS; check_all nvme
  busy $BDFS; timed par_pre sh /tmp/par_pre.sh $BDFS; wait; check_all vfio-pci
  timed bare_post sh /tmp/bare_post.sh $BDFS; check_all nvme
  busy $BDFS; timed hook_pre $HOOK 100 pre-start; wait; check_all vfio-pci
  timed hook_post $HOOK 100 post-stop; check_all nvme
done
exit 0
"""


def guest(args) -> None:
    sys.path.insert(0, str(REPO / "tests" / "vm"))
    from guest_rebind import GUEST_PRELUDE, parse
    from harness import Topology, run_guest

    state = header(f"many devices, real kernel (TCG): 8 NVMe, drives throttled to {args.iops}"
                   f" IOPS with {args.inflight} direct reads in flight each")
    topo = Topology()
    for i in range(8):
        topo.isolated_nvme(f"M{i}", size="64M", iops=args.iops)
    script = GUEST_PRELUDE.replace("udevadm settle\n", "udevadm settle\n", 1)
    res = run_guest(script + f"REPEAT={args.repeat}\nINFLIGHT={args.inflight}\n" + GUEST_SCRIPT,
                    topo, timeout=1500, mem="1536M")
    if res.exit_code != 0 or "WRONG" in res.output:
        raise SystemExit(f"guest script failed ({res.exit_code}):\n{res.output}")
    rows = parse(res.output)
    print(f"boot + script: {res.duration:.0f} s wall; console: {res.console_log}")
    print(f"{'':22} {'wall':>7} {'user':>7} {'sys':>7} {'idle':>7}   (s, medians)")
    for name, label in [("one_bare_pre", "1 device, shell"), ("seq_pre", "8, shell, one by one"),
                        ("par_pre", "8, shell, all at once"), ("hook_pre", "8, hook pre-start"),
                        ("bare_post", "8 back, shell at once"), ("hook_post", "8, hook post-stop")]:
        r = rows[name]
        w, u, s = (med(x[i] for x in r) for i in range(3))
        print(f"{label:22} {w:>7.2f} {u:>7.2f} {s:>7.2f} {med(x[0] - x[1] - x[2] for x in r):>7.2f}"
              f"   n={len(r)}")
    footer(state)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--delay", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--guest", action="store_true")
    ap.add_argument("--iops", type=int, default=4)
    ap.add_argument("--inflight", type=int, default=4)
    args = ap.parse_args()
    guest(args) if args.guest else fake(args)


if __name__ == "__main__":
    main()
