"""Shared by the benchmark scripts: running a process with its rusage, medians, the
machine and its load, and fake Proxmox nodes built with tests/fakesys.py.

Benchmarks print figures; they assert nothing about time.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO / "tests"), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)


@dataclass
class Sample:
    wall: float
    user: float
    sys: float
    rc: int

    @property
    def cpu(self) -> float:
        return self.user + self.sys

    @property
    def idle(self) -> float:
        """Time neither in user space nor in the kernel on our behalf: waiting."""
        return self.wall - self.user - self.sys


def run(cmd: list[str], env: dict | None = None, stdin=subprocess.DEVNULL,
        cwd: str | Path | None = None) -> Sample:
    """One process: wall time, and user/sys time of it and every child it waited for."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdin=stdin, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=cwd)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Sample(wall, ru.ru_utime, ru.ru_stime, proc.returncode)


def round_robin(cases: list[tuple[str, list[str], int]], env: dict,
                repeat: int) -> dict[str, list[Sample]]:
    """Each case (name, command, expected exit code) once to warm up (page cache, .pyc
    files), then `repeat` rounds of all of them in turn, so a change in the machine's
    load falls on every case alike. Exits with the command's output on a wrong exit code."""
    for _, cmd, _ in cases:
        run(cmd, env)
    samples: dict[str, list[Sample]] = {name: [] for name, _, _ in cases}
    for _ in range(repeat):
        for name, cmd, expect in cases:
            s = run(cmd, env)
            if s.rc != expect:
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                sys.exit(f"{name}: exit {s.rc}, expected {expect}\n{out.stdout}{out.stderr}")
            samples[name].append(s)
    return samples


def med(values) -> float:
    return statistics.median(values)


def ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def base_env(**extra: str) -> dict:
    """The environment of every measured process: the work tree first on sys.path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PVEHOOK_", "PYTHON"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


# -- the machine and its load -------------------------------------------------------------

def machine() -> str:
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.node()}: {model}, {os.cpu_count()} CPUs, Linux {platform.release()}")


def qemu_guests() -> list[str]:
    """QEMU processes running now (other engineers' guests disturb the figures)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith("qemu-system"):
            out.append(pid)
    return out


def load_line() -> str:
    one, five, _ = os.getloadavg()
    guests = qemu_guests()
    return (f"load {one:.2f} (1 min) {five:.2f} (5 min), {len(guests)} QEMU process(es)"
            f" running{' [pids ' + ' '.join(guests) + ']' if guests else ''}")


def disturbed(before: tuple[float, float, float], guests_before: list[str]) -> str | None:
    """A reason to distrust the figures, or None."""
    one = max(before[0], os.getloadavg()[0])
    guests = set(guests_before) | set(qemu_guests())
    reasons = []
    if guests:
        reasons.append(f"{len(guests)} QEMU guest(s) ran meanwhile")
    if one > 0.5 * (os.cpu_count() or 1):
        reasons.append(f"load average {one:.2f} on {os.cpu_count()} CPUs")
    return "; ".join(reasons) or None


def header(title: str, python: str | None = None) -> tuple:
    print(f"== {title}")
    print(f"machine: {machine()}")
    if python:
        v = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                           capture_output=True, text=True).stdout.strip()
        print(f"python: {python} ({v})")
    print(f"at start: {load_line()}")
    return os.getloadavg(), qemu_guests()


def footer(state: tuple) -> None:
    print(f"at end: {load_line()}")
    why = disturbed(*state)
    print("figures: " + (f"DISTURBED ({why})" if why else "undisturbed (idle machine)"))


# -- fake nodes ---------------------------------------------------------------------------

def nvme_addr(i: int) -> str:
    """The i-th controller (0-based): one per bus, like NVMe behind root ports."""
    return f"0000:{i + 1:02x}:00.0"


def fake_node(base: Path, controllers: int, vms: int = 0, vm_devices: dict | None = None,
              delay: float = 0.0, vfio_loaded: bool = True):
    """A FakeHost with `controllers` NVMe controllers (each alone in its IOMMU group, one
    namespace with two partitions), a NIC, and `vms` VM configs. `vm_devices` maps vmid ->
    list of controller indexes for its hostpci lines; the other VMs get none (or a NIC).
    `delay`: seconds every unbind of a controller takes (a drive shutting down)."""
    from fakesys import NIC_CLASS, FakeHost, FakeNamespace

    host = FakeHost(base, vfio_loaded=vfio_loaded)
    for i in range(controllers):
        addr = nvme_addr(i)
        host.add_pci(addr, group=i + 1, serial=f"S{i:03d}",
                     namespaces=[FakeNamespace(partitions=2, part_fs_types=["ext4", "ext4"])])
        if delay:
            host.fault(addr, "unbind", "delay", delay)
    host.add_pci("0000:00:19.0", cls=NIC_CLASS, vendor=0x8086, device=0x15b8,
                 group=controllers + 1)
    host.root.pve("storage.cfg").write_text(
        "dir: local\n\tpath /var/lib/vz\n\tcontent iso,vztmpl,backup,images,snippets\n")
    vm_devices = vm_devices or {}
    for n in range(vms):
        vmid = 100 + n
        lines = ["boot: order=scsi0", "cores: 4", "memory: 8192", "name: vm%d" % vmid,
                 "net0: virtio=BC:24:11:00:00:%02x,bridge=vmbr0" % (n % 256),
                 "machine: q35", "ostype: l26",
                 "scsi0: local:%d/vm-%d-disk-0.qcow2,size=32G" % (vmid, vmid),
                 "scsihw: virtio-scsi-pci", "hookscript: local:snippets/pvehook-hook"]
        for j, idx in enumerate(vm_devices.get(vmid, [])):
            lines.append(f"hostpci{j}: {nvme_addr(idx)[5:]},pcie=1")
        lines += ["", "[snap1]", "memory: 4096", "snaptime: 1700000000"]
        host.root.pve("qemu-server", f"{vmid}.conf").write_text("\n".join(lines) + "\n")
    return host




def rusage_self() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime
