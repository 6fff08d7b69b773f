"""Boot a real kernel under QEMU (TCG, q35 + intel-iommu) and run a bash script in it.

The guest is Debian trixie (the userland of a Proxmox VE 9 node) with trixie's kernel,
built once by tests/vm/setup.sh into PVEHOOK_VM_CACHE. Nothing is copied into images:
the host's / is shared read-only over 9p, the guest root is a tmpfs overlay over the
cached trixie tree, and the source tree is bind-mounted at /src.

Typical use::

    topo = Topology().isolated_nvme("S1").shared_group_nvme_and_nic("S2")
    res = run_guest("modprobe nvme && ls /sys/class/nvme", topo)
    assert res.exit_code == 0, res.output

tests/vm/README.md describes what the guest offers (paths, env, helpers, modules).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC_DIR = HERE.parent.parent  # the repository root, mounted at /src in the guest
CACHE = Path(os.environ.get("PVEHOOK_VM_CACHE", "/var/cache/pvehook-vm"))
QEMU = os.environ.get("PVEHOOK_VM_QEMU", "qemu-system-x86_64")
SENTINEL = re.compile(rb"PVEHOOK-VM-EXIT=(\d+)")
INIT_ERROR = re.compile(rb"PVEHOOK-VM-ERROR: ([^\r\n]*)")

# 00:00.0 is the q35 host bridge, 00:1f.x the ICH9 functions; the two 9p shares are
# pinned to 02.0 and 03.0 so every device added by Topology gets a predictable address.
_FIRST_FREE_SLOT = 4
_LAST_SLOT = 0x1E


class GuestError(RuntimeError):
    """The guest did not report an exit code (timeout, panic, init failure)."""

    def __init__(self, message: str, console_log: Path | None = None, console_tail: str = ""):
        super().__init__(f"{message}\n--- console tail ({console_log}) ---\n{console_tail}")
        self.console_log = console_log
        self.console_tail = console_tail


@dataclass
class Device:
    """One device the guest will see. ``bdf`` is its guest PCI address (0000:BB:DD.F)."""

    kind: str  # "nvme", "nic", "bridge", "root-port", "virtio-blk"
    bdf: str
    serial: str | None = None
    image: Path | None = None  # backing file (disks only)
    size: str | None = None
    group: str | None = None  # label shared by devices meant to share an IOMMU group
    qemu_args: list[str] = field(default_factory=list, repr=False)


class Topology:
    """Builder for the guest's PCI layout. Each helper returns self (chainable).

    Guest addresses are predicted from SeaBIOS's bus numbering (bridges numbered in
    slot order, 1, 2, ...); test_harness.py checks the prediction against the guest.
    ``image``: pass a path to keep a disk across boots (created sparse if missing);
    otherwise a sparse image is created in the boot's work dir and deleted after it.
    """

    def __init__(self) -> None:
        self.devices: list[Device] = []
        self._slot = _FIRST_FREE_SLOT
        self._bus = 0  # last secondary bus number handed out
        self._n = 0  # unique ids for qemu objects

    # --- helpers ------------------------------------------------------------------------
    def _next_slot(self) -> int:
        if self._slot > _LAST_SLOT:
            raise ValueError("no free slot left on pcie.0")
        s, self._slot = self._slot, self._slot + 1
        return s

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def _disk(self, kind, bdf, serial, size, image, group, device_args: str,
              drive_opts: str = "") -> Device:
        drive = self._id("d")
        dev = Device(kind, bdf, serial=serial, size=size, group=group,
                     image=Path(image) if image else None)
        # The file is filled in by run_guest (it knows the work dir); keep a placeholder.
        dev.qemu_args = ["-drive", f"file={{image}},if=none,id={drive},format=raw,cache=unsafe{drive_opts}",
                         "-device", f"{device_args},drive={drive}"]
        self.devices.append(dev)
        return dev

    def _root_port(self) -> str:
        """A pcie-root-port in the next free slot of pcie.0; returns its id. The device
        behind it gets the next bus number (self._bus) and its own IOMMU group."""
        slot = self._next_slot()
        self._bus += 1
        rp = self._id("rp")
        self.devices.append(Device("root-port", f"0000:00:{slot:02x}.0", qemu_args=[
            "-device", f"pcie-root-port,id={rp},chassis={self._bus},slot={self._bus},addr={slot:x}.0"]))
        return rp

    def _subsys_nvme(self, serial: str, size: str, image, subsys_opts: str, nvme_opts: str,
                     ns_opts: str) -> "Topology":
        """An NVMe controller in an nvme-subsys, with one nvme-ns, behind a root port."""
        rp = self._root_port()
        sub, ctrl, drive = self._id("subsys"), self._id("ctrl"), self._id("d")
        dev = Device("nvme", f"0000:{self._bus:02x}:00.0", serial=serial, size=size,
                     image=Path(image) if image else None)
        dev.qemu_args = [
            "-drive", f"file={{image}},if=none,id={drive},format=raw,cache=unsafe",
            "-device", f"nvme-subsys,id={sub}{subsys_opts}",
            "-device", f"nvme,id={ctrl},serial={serial},subsys={sub},bus={rp}{nvme_opts}",
            "-device", f"nvme-ns,bus={ctrl},drive={drive},nsid=1{ns_opts}"]
        self.devices.append(dev)
        return self

    # --- public builders ----------------------------------------------------------------
    def isolated_nvme(self, serial: str, size: str = "256M", image: str | Path | None = None,
                      iops: int | None = None) -> "Topology":
        """NVMe behind its own pcie-root-port: alone in its IOMMU group. ``iops`` throttles
        its drive (QEMU throttling.iops-total): with I/O in flight, unbinding nvme then
        waits for that I/O to drain, like a slow real drive."""
        rp = self._root_port()
        self._disk("nvme", f"0000:{self._bus:02x}:00.0", serial, size, image, None,
                   f"nvme,serial={serial},bus={rp}",
                   f",throttling.iops-total={iops}" if iops else "")
        return self

    def shared_group_nvme_and_nic(self, serial: str, size: str = "256M", image: str | Path | None = None,
                                  nic_model: str = "e1000") -> "Topology":
        """pcie-pci-bridge with the NVMe at addr 1 and a NIC at addr 2: one IOMMU group
        holding the bridge, the NVMe and the NIC (non-viable for VFIO once the NIC has
        a driver: ``modprobe e1000``)."""
        slot = self._next_slot()
        self._bus += 1
        br = self._id("br")
        group = f"shared-{serial}"
        self.devices.append(Device("bridge", f"0000:00:{slot:02x}.0", group=group, qemu_args=[
            "-device", f"pcie-pci-bridge,id={br},addr={slot:x}.0"]))
        self._disk("nvme", f"0000:{self._bus:02x}:01.0", serial, size, image, group,
                   f"nvme,serial={serial},bus={br},addr=1")
        # No netdev: the NIC only has to exist (qemu warns "no peer", harmlessly).
        self.devices.append(Device("nic", f"0000:{self._bus:02x}:02.0", group=group, qemu_args=[
            "-device", f"{nic_model},bus={br},addr=2"]))
        return self

    def sriov_nvme(self, serial: str, size: str = "256M", image: str | Path | None = None,
                   max_vfs: int = 2) -> "Topology":
        """SR-IOV capable NVMe (PF) behind its own root port, as in QEMU's docs: the
        namespace is detached (attach it with nvme-cli), the secondary controllers are
        offline until ``nvme virt-mgmt`` brings them online; then sriov_numvfs creates the
        VFs at <bus>:00.1, 00.2, ..."""
        return self._subsys_nvme(
            serial, size, image, "",
            f",sriov_max_vfs={max_vfs},sriov_vq_flexible=8,sriov_vi_flexible=6,"
            "max_ioqpairs=13,msix_qsize=7",
            ",shared=false,detached=true")

    def multipath_nvme(self, serial: str, size: str = "256M", image: str | Path | None = None) -> "Topology":
        """NVMe in an NVMe subsystem (CMIC multi-controller) behind its own root port: the
        kernel's native multipath shows the namespace as a head nvme<S>n1 under the
        subsystem and a hidden path nvme<S>c<C>n1 under the controller."""
        return self._subsys_nvme(serial, size, image, f",nqn=nqn.2026-11.pvehook:{serial}",
                                 "", ",shared=on")

    def root_nvme(self, serial: str, size: str = "256M", image: str | Path | None = None) -> "Topology":
        """NVMe directly on pcie.0 (its own IOMMU group, no root port above it)."""
        slot = self._next_slot()
        self._disk("nvme", f"0000:00:{slot:02x}.0", serial, size, image, None,
                   f"nvme,serial={serial},addr={slot:x}.0")
        return self

    def plain_disk(self, serial: str, size: str = "512M", image: str | Path | None = None) -> "Topology":
        """virtio-blk disk on pcie.0 (``modprobe virtio_blk``; /dev/vdX, ID_SERIAL=serial):
        a non-NVMe "host" disk, e.g. for the host's own LVM."""
        slot = self._next_slot()
        self._disk("virtio-blk", f"0000:00:{slot:02x}.0", serial, size, image, None,
                   f"virtio-blk-pci,serial={serial},addr={slot:x}.0")
        return self

    # --- queries ------------------------------------------------------------------------
    def nvmes(self) -> list[Device]:
        return [d for d in self.devices if d.kind == "nvme"]

    def bdf(self, serial: str) -> str:
        """Guest PCI address of the disk with this serial."""
        for d in self.devices:
            if d.serial == serial:
                return d.bdf
        raise KeyError(serial)

    def by_kind(self, kind: str) -> list[Device]:
        return [d for d in self.devices if d.kind == kind]


@dataclass
class GuestResult:
    exit_code: int
    output: str  # the script's own stdout+stderr (from /results/out.log)
    results_dir: Path  # host dir shared read-write as /results in the guest
    console_log: Path  # full serial console (kernel + init + "[script] " lines)
    duration: float  # wall seconds from qemu start to its exit

    @property
    def console(self) -> str:
        return self.console_log.read_text(errors="replace")


def _env_name(serial: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", serial)


# Sourced by the guest before the script: addresses of the topology's devices and a
# few sysfs helpers that every scenario needs.
_ENV_HELPERS = r"""
# vm_driver BDF -> driver name bound to BDF, or "none"
vm_driver() { local l=/sys/bus/pci/devices/$1/driver; [ -e "$l" ] && basename "$(readlink -f "$l")" || echo none; }
# vm_bind BDF DRIVER -> rebind through driver_override/unbind/drivers_probe (raw sysfs)
vm_bind() {
    local d=/sys/bus/pci/devices/$1
    echo "$2" > "$d/driver_override"
    [ -e "$d/driver" ] && echo "$1" > "$d/driver/unbind"
    echo "$1" > /sys/bus/pci/drivers_probe
    echo > "$d/driver_override"
    [ "$(vm_driver "$1")" = "$2" ]
}
# vm_group BDF -> BDFs in BDF's IOMMU group, one per line
vm_group() { ls "/sys/bus/pci/devices/$1/iommu_group/devices"; }
# vm_nvme_ctrl BDF -> nvmeN controller name under BDF (needs the nvme driver bound)
vm_nvme_ctrl() { ls "/sys/bus/pci/devices/$1/nvme" 2>/dev/null | head -1; }
# vm_nvme_disk SERIAL -> /dev/nvmeXnY of the first namespace of the controller with SERIAL
# (with native multipath: the head's node)
vm_nvme_disk() {
    local c
    for c in /sys/class/nvme/nvme*; do
        [ "$(tr -d ' ' < "$c/serial")" = "$1" ] || continue
        # A multipath path nvmeXcYnZ stands for the head nvmeXnZ, the real block device.
        for n in "$c"/nvme*n*; do [ -e "$n" ] && { basename "$n" | sed 's/^\(nvme[0-9]*\)c[0-9]*\(n[0-9]*\)$/\/dev\/\1\2/; t; s/^/\/dev\//'; return 0; }; done
    done
    return 1
}
# vm_vfio_open BDF -> proves BDF is usable through VFIO: a nested, paused QEMU realizes
# it as vfio-pci (QMP query-pci shows it); prints the QMP reply, returns non-zero if not.
vm_vfio_open() {
    local out
    out=$(printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"query-pci"}' '{"execute":"quit"}' |
        timeout 60 qemu-system-x86_64 -S -machine q35 -accel tcg -m 64 -nodefaults -display none \
            -device "vfio-pci,host=$1" -qmp stdio 2>/tmp/vm_vfio_open.err)
    echo "$out"; cat /tmp/vm_vfio_open.err
    # Realized = query-pci lists a device with the host device's vendor and device ids.
    local v=$(( $(cat /sys/bus/pci/devices/$1/vendor) )) d=$(( $(cat /sys/bus/pci/devices/$1/device) ))
    echo "$out" | jq -s -e --argjson v "$v" --argjson d "$d" \
        '[.[] | .. | objects | select(has("qdev_id") and .id.vendor == $v and .id.device == $d)] | length > 0' \
        >/dev/null
}
export -f vm_driver vm_bind vm_group vm_nvme_ctrl vm_nvme_disk vm_vfio_open
"""


def _make_image(path: Path, size: str) -> None:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["truncate", "-s", size, str(path)], check=True)


def _tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no console log)"
    return "\n".join(lines[-n:])


def run_guest(
    script: str,
    topology: Topology | None = None,
    timeout: float = 300,
    mem: str = "1024M",
    smp: int = 1,
    extra_kernel_args: list[str] | tuple[str, ...] = (),
    extra_qemu_args: list[str] | tuple[str, ...] = (),
    files: dict[str, str | bytes] | None = None,
    workdir: str | Path | None = None,
    src_dir: str | Path = SRC_DIR,
    pre_udev: str | None = None,
    state_dir: str | Path | None = None,
) -> GuestResult:
    """Boot the guest, run ``script`` with bash in /src, return its exit code and output.

    files: extra files written into the results dir before boot (guest: /results/NAME).
    workdir: where console.log, results/ and the temporary disk images go; a fresh
    temp dir (kept after the run, images deleted) when None.
    pre_udev: a bash script run in the guest root before udevd starts (its output in
    /results/pre-udev.log): what a node does at boot before it sees its devices.
    state_dir: a host dir shared read-write as /state in the guest; pass the same one to
    two boots (and the same disk images) to model a node's reboot.
    Raises GuestError if no exit code is reported before ``timeout`` (qemu is killed).
    """
    topology = topology or Topology()
    kver_file = CACHE / "kernel" / "version"
    initrd = CACHE / f"initrd-{hashlib.sha256((HERE / 'init.sh').read_bytes()).hexdigest()[:16]}.img"
    if not kver_file.exists() or not initrd.exists():
        raise GuestError(f"VM cache {CACHE} is not built: run tests/vm/setup.sh as root")
    kernel = CACHE / "kernel" / "vmlinuz"

    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="pvehook-vm-"))
    work.mkdir(parents=True, exist_ok=True)
    results = work / "results"
    if results.exists():
        shutil.rmtree(results)
    results.mkdir()
    console_log = work / "console.log"
    imgdir = work / "images"

    (results / "script.sh").write_text(script)
    env_lines = ["# generated by tests/vm/harness.py"]
    for d in topology.devices:
        if d.serial:
            env_lines.append(f"export VM_BDF_{_env_name(d.serial)}={shlex.quote(d.bdf)}")
    (results / "env.sh").write_text("\n".join(env_lines) + "\n" + _ENV_HELPERS)
    (results / "topology.json").write_text(json.dumps(
        [{"kind": d.kind, "bdf": d.bdf, "serial": d.serial, "group": d.group, "size": d.size}
         for d in topology.devices], indent=1))
    if pre_udev is not None:
        (results / "pre-udev.sh").write_text(pre_udev)
    for name, content in (files or {}).items():
        p = results / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)

    temp_images: list[Path] = []
    dev_args: list[str] = []
    for d in topology.devices:
        args = list(d.qemu_args)
        if d.image is None and d.size:
            img = imgdir / f"{_env_name(d.serial or d.bdf)}.img"
            img.unlink(missing_ok=True)
            temp_images.append(img)
        else:
            img = d.image
        if img is not None:
            _make_image(img, d.size or "256M")
            args = [a.replace("{image}", str(img)) for a in args]
        dev_args += args

    append = " ".join([
        "console=ttyS0", "intel_iommu=on", "iommu=pt", "panic=-1",
        # On a loaded host TCG's timer can look broken to the kernel's boot-time check
        # ("timer doesn't work through Interrupt-remapped IO-APIC": a panic); skip it.
        "no_timer_check",
        f"pvehook.cache={CACHE}", f"pvehook.src={Path(src_dir).resolve()}",
        *extra_kernel_args])
    cmd = [
        QEMU,
        "-machine", "q35,kernel-irqchip=split", "-accel", "tcg",
        # intel-iommu has to be created before the PCI devices it translates for.
        "-device", "intel-iommu,intremap=on,caching-mode=on",
        "-m", mem, "-smp", str(smp),
        # -nodefaults drops the CD-ROM, parallel port, VGA and NIC that udev would
        # otherwise spend seconds on; the serial console goes to stdout (= -nographic).
        "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
        "-fsdev", "local,id=fshost,path=/,security_model=none,readonly=on",
        "-device", "virtio-9p-pci,fsdev=fshost,mount_tag=hostroot,addr=2.0",
        "-fsdev", f"local,id=fsres,path={results},security_model=none",
        "-device", "virtio-9p-pci,fsdev=fsres,mount_tag=results,addr=3.0",
        *dev_args, *extra_qemu_args,
    ]
    if state_dir is not None:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        cmd += ["-fsdev", f"local,id=fsstate,path={Path(state_dir).resolve()},security_model=none",
                "-device", "virtio-9p-pci,fsdev=fsstate,mount_tag=state,addr=1.0"]
    (work / "qemu-cmd.txt").write_text(shlex.join(cmd) + "\n")

    start = time.monotonic()
    exit_code: int | None = None
    error: str | None = None
    with open(console_log, "wb") as log, open(console_log, "rb") as reader:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        buf = b""
        try:
            while True:
                buf += reader.read()
                m = SENTINEL.search(buf)
                if m:
                    exit_code = int(m.group(1))
                    break
                m = INIT_ERROR.search(buf)
                if m:
                    error = f"guest init failed: {m.group(1).decode(errors='replace')}"
                    break
                if proc.poll() is not None:
                    buf += reader.read()
                    m = SENTINEL.search(buf)
                    if m:
                        exit_code = int(m.group(1))
                    else:
                        error = f"qemu exited (rc={proc.returncode}) without an exit code"
                    break
                if time.monotonic() - start > timeout:
                    error = f"timeout after {timeout}s"
                    break
                time.sleep(0.1)
            # The guest powers off right after the sentinel; give it a moment, then kill.
            try:
                proc.wait(timeout=15 if error is None else 0.1)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    duration = time.monotonic() - start
    for img in temp_images:
        img.unlink(missing_ok=True)

    if error is not None:
        raise GuestError(error, console_log, _tail(console_log))
    out_file = results / "out.log"
    output = out_file.read_text(errors="replace") if out_file.exists() else ""
    return GuestResult(exit_code=exit_code, output=output, results_dir=results,
                       console_log=console_log, duration=duration)
