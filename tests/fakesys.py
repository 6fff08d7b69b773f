"""A temporary tree shaped like the kernel's sysfs, and a small fake kernel.

The tree has the kernel's layout and real relative symlinks (driver, iommu_group,
/sys/block, /sys/bus/pci/devices). `FakeKernel` performs what a write to
driver_override, unbind, bind, new_id and drivers_probe does on a real kernel: it moves
the driver link, creates or removes the NVMe controller's namespaces (with new names,
as the kernel does), their /dev nodes and their udev database entries. It can fail,
hang or be slow on demand, or stop at a gate until the test opens it.

Where the kernel makes a write wait or refuse, so does the fake: unbinding vfio-pci waits
while any process has the group's /dev/vfio node open (vfio_unregister_group_dev; found
through the real /proc/*/fd, as the kernel knows its openers; a line goes to the fake's
dmesg, as "Device is currently in use, task ... blocked until device is released" does),
and `bind`/`drivers_probe` only take a device the driver matches: its driver_override,
or an id in the driver's table (the class's usual driver) or added with new_id.

Every bit of state lives in the tree itself, because pvehook performs the writes in a
forked child (to put a deadline on them).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pvehook.kernel import Kernel
from pvehook.paths import Root

NVME_CLASS = 0x010802
NIC_CLASS = 0x020000
BRIDGE_CLASS = 0x060400


@dataclass
class FakeNamespace:
    partitions: int = 0
    fs_type: str | None = None  # udev ID_FS_TYPE of the whole namespace
    part_fs_types: list[str | None] = field(default_factory=list)


def _rel_link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


class FakeHost:
    """Builds the tree. `root` is what pvehook is given."""

    def __init__(self, base: Path, iommu: bool = True, vfio_loaded: bool = False):
        self.base = Path(base)
        self.root = Root(self.base)
        self.sys = self.root.sys()
        self.fake = self.base / "fake"  # the fake kernel's own bookkeeping
        self.fake.mkdir(parents=True, exist_ok=True)
        for d in ("bus/pci/devices", "block", "class/block", "kernel/iommu_groups",
                  "class/iommu", "devices/pci0000:00"):
            (self.sys / d).mkdir(parents=True, exist_ok=True)
        (self.sys / "bus/pci/drivers_probe").write_text("")
        if iommu:
            (self.sys / "class/iommu/dmar0").mkdir()
        for d in ("nvme", "pcieport", "e1000e"):
            self.add_driver(d)
        if vfio_loaded:
            self.add_driver("vfio-pci")
        self.root.proc("self").mkdir(parents=True, exist_ok=True)
        self.root.proc("self/mountinfo").write_text(
            "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n")
        self.root.proc("swaps").write_text(
            "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n")
        for d in ("udev/data", "qemu-server", "lock"):
            self.root.run(d).mkdir(parents=True, exist_ok=True)
        self.root.dev().mkdir(parents=True, exist_ok=True)
        self.root.pve("qemu-server").mkdir(parents=True, exist_ok=True)
        self._save_state({"next_ctrl": 0, "next_minor": 0, "busy": [], "faults": {}})
        self.boot("boot-0")  # every kernel has a boot id (the pins' records carry it)

    @classmethod
    def reopen(cls, base: Path) -> "FakeHost":
        """The host of an existing tree (in another process: a hook run on it)."""
        host = cls.__new__(cls)
        host.base = Path(base)
        host.root = Root(host.base)
        host.sys = host.root.sys()
        host.fake = host.base / "fake"
        return host

    # -- bookkeeping -------------------------------------------------------------
    def _state(self) -> dict:
        return json.loads((self.fake / "state.json").read_text())

    def _save_state(self, state: dict) -> None:
        tmp = self.fake / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(self.fake / "state.json")

    def _spec(self, addr: str) -> dict:
        return json.loads((self.fake / f"{addr}.json").read_text())

    # -- building ----------------------------------------------------------------
    def add_driver(self, name: str) -> None:
        d = self.sys / "bus/pci/drivers" / name
        d.mkdir(parents=True, exist_ok=True)
        for f in ("bind", "unbind", "new_id", "remove_id"):
            (d / f).write_text("")

    def device_dir(self, addr: str) -> Path:
        return (self.sys / "bus/pci/devices" / addr).resolve()

    def add_pci(self, addr: str, *, cls: int = NVME_CLASS, vendor: int = 0x1B36,
                device: int = 0x0010, driver: str | None = "default",
                group: int | None = None, parent: str | None = None,
                namespaces: list[FakeNamespace] | None = None, serial: str | None = None,
                default_driver: str | None = None) -> Path:
        """Add one PCI function. driver="default" binds the class's usual driver."""
        if default_driver is None:
            default_driver = {NVME_CLASS: "nvme", NIC_CLASS: "e1000e",
                              BRIDGE_CLASS: "pcieport"}.get(cls)
        parent_dir = self.device_dir(parent) if parent else self.sys / "devices/pci0000:00"
        d = parent_dir / addr
        d.mkdir(parents=True)
        (d / "class").write_text(f"0x{cls:06x}\n")
        (d / "vendor").write_text(f"0x{vendor:04x}\n")
        (d / "device").write_text(f"0x{device:04x}\n")
        (d / "driver_override").write_text("(null)\n")
        (d / "reset").write_text("")
        _rel_link(self.sys / "bus/pci/devices" / addr, d)
        if group is not None:
            g = self.sys / "kernel/iommu_groups" / str(group)
            (g / "devices").mkdir(parents=True, exist_ok=True)
            _rel_link(g / "devices" / addr, d)
            _rel_link(d / "iommu_group", g)
        spec = {
            "addr": addr, "default_driver": default_driver, "serial": serial or addr,
            "group": group,
            "namespaces": [ns.__dict__ for ns in (namespaces or [])] if cls == NVME_CLASS else [],
        }
        (self.fake / f"{addr}.json").write_text(json.dumps(spec))
        if driver == "default":
            driver = default_driver
        if driver:
            self.attach(addr, driver)
        return d

    # -- what the kernel does --------------------------------------------------
    @contextmanager
    def _kernel_lock(self):
        # Writes for different devices run in parallel processes; the kernel serializes
        # its own bookkeeping (instance and minor numbers), so does the fake.
        with open(self.fake / "lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def attach(self, addr: str, driver: str) -> None:
        with self._kernel_lock():
            self._attach(addr, driver)

    def detach(self, addr: str) -> None:
        with self._kernel_lock():
            self._detach(addr)

    def _attach(self, addr: str, driver: str) -> None:
        d = self.device_dir(addr)
        drv = self.sys / "bus/pci/drivers" / driver
        _rel_link(d / "driver", drv)
        _rel_link(drv / addr, d)
        spec = self._spec(addr)
        if driver == "nvme":
            self._create_controller(addr, d, spec)
        elif driver == "vfio-pci" and spec["group"] is not None:
            (self.root.dev("vfio")).mkdir(exist_ok=True)
            self.root.dev("vfio", str(spec["group"])).write_text("")

    def _detach(self, addr: str) -> None:
        d = self.device_dir(addr)
        link = d / "driver"
        if not link.is_symlink():
            return
        driver = os.path.basename(os.readlink(link))
        if driver == "nvme":
            self._remove_controller(d)
        elif driver == "vfio-pci":
            group = self._spec(addr)["group"]
            if group is not None:
                self.root.dev("vfio", str(group)).unlink(missing_ok=True)
        (self.sys / "bus/pci/drivers" / driver / addr).unlink()
        link.unlink()

    def _create_controller(self, addr: str, d: Path, spec: dict) -> None:
        state = self._state()
        ctrl = f"nvme{state['next_ctrl']}"
        state["next_ctrl"] += 1
        cdir = d / "nvme" / ctrl
        cdir.mkdir(parents=True)
        (cdir / "serial").write_text(spec["serial"] + "\n")
        (cdir / "model").write_text("QEMU NVMe Ctrl\n")
        for i, ns in enumerate(spec["namespaces"], start=1):
            name = f"{ctrl}n{i}"
            self._add_block(cdir / name, name, state, spec, ns["fs_type"])
            for p in range(1, ns["partitions"] + 1):
                types = ns["part_fs_types"]
                self._add_block(cdir / name / f"{name}p{p}", f"{name}p{p}", state, spec,
                                types[p - 1] if p - 1 < len(types) else None, part=p)
        self._save_state(state)

    def _add_block(self, bdir: Path, name: str, state: dict, spec: dict,
                   fs_type: str | None, part: int | None = None) -> None:
        bdir.mkdir(parents=True)
        minor = state["next_minor"]
        state["next_minor"] += 1
        (bdir / "dev").write_text(f"259:{minor}\n")
        (bdir / "size").write_text("524288\n")
        (bdir / "holders").mkdir()
        if part is not None:
            (bdir / "partition").write_text(f"{part}\n")
        else:
            (bdir / "wwid").write_text(f"nvme.1b36-{spec['serial']}\n")
        _rel_link(self.sys / "class/block" / name, bdir)
        if part is None:
            _rel_link(self.sys / "block" / name, bdir)
        self.root.dev(name).write_text("")
        props = [f"E:ID_SERIAL=QEMU_NVMe_Ctrl_{spec['serial']}_1", f"E:DEVNAME=/dev/{name}"]
        if fs_type:
            props.append(f"E:ID_FS_TYPE={fs_type}")
        self.root.run("udev/data", f"b259:{minor}").write_text("\n".join(props) + "\n")

    def _remove_controller(self, d: Path) -> None:
        for blk in sorted((d / "nvme").rglob("dev"), key=lambda p: len(p.parts), reverse=True):
            bdir = blk.parent
            name = bdir.name
            self.root.run("udev/data", "b" + blk.read_text().strip()).unlink(missing_ok=True)
            (self.sys / "class/block" / name).unlink(missing_ok=True)
            (self.sys / "block" / name).unlink(missing_ok=True)
            self.root.dev(name).unlink(missing_ok=True)
        shutil.rmtree(d / "nvme", ignore_errors=True)

    # -- how the host uses disks -------------------------------------------------
    def block(self, name: str) -> Path:
        return (self.sys / "class/block" / name).resolve()

    def devnum(self, name: str) -> str:
        return (self.block(name) / "dev").read_text().strip()

    def mount(self, name: str, mountpoint: str, fstype: str = "ext4") -> None:
        with open(self.root.proc("self/mountinfo"), "a") as f:
            f.write(f"99 22 {self.devnum(name)} / {mountpoint} rw shared:9 - {fstype} "
                    f"/dev/{name} rw\n")

    def swapon(self, name: str) -> None:
        with open(self.root.proc("swaps"), "a") as f:
            f.write(f"/dev/{name}\t\tpartition\t1048572\t\t0\t\t-2\n")

    def hold(self, name: str, holder: str = "dm-0", dm_name: str = "vg0-lv0",
             uuid: str = "LVM-abc") -> None:
        hdir = self.sys / "devices/virtual/block" / holder
        (hdir / "dm").mkdir(parents=True, exist_ok=True)
        (hdir / "dm/name").write_text(dm_name + "\n")
        (hdir / "dm/uuid").write_text(uuid + "\n")
        (hdir / "dev").write_text("253:0\n")
        (hdir / "holders").mkdir(exist_ok=True)
        _rel_link(self.sys / "class/block" / holder, hdir)
        _rel_link(self.block(name) / "holders" / holder, hdir)

    def vm_config(self, vmid: int, text: str) -> None:
        """Write /etc/pve/qemu-server/<vmid>.conf."""
        self.root.pve("qemu-server", f"{vmid}.conf").write_text(text)

    def set_busy(self, name: str) -> None:
        """Someone holds the block device open with O_EXCL (e.g. a ZFS pool)."""
        state = self._state()
        state["busy"].append(name)
        self._save_state(state)

    def fault(self, addr: str, op: str, kind: str, value: float | int | str = 0,
              driver: str | None = None) -> None:
        """Make `op` (unbind; probe: a driver taking it by drivers_probe or bind;
        override: a write to its driver_override) fail (kind="errno", value=errno), do
        nothing (kind="ignore"), take `value` seconds (kind="delay"), or wait at the gate
        named `value` until the test opens it (kind="gate", see gate/open_gate); only for
        `driver` when given."""
        state = self._state()
        state["faults"].setdefault(addr, {})[f"{op}:{driver}" if driver else op] = [kind, value]
        self._save_state(state)

    def gate(self, name: str, timeout: float = 30.0) -> None:
        """Wait until a write has arrived at the gate `name` (a fault of kind "gate")."""
        deadline = time.monotonic() + timeout
        while not (self.fake / f"at-{name}").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no write arrived at gate {name} within {timeout} s")
            time.sleep(0.01)

    def open_gate(self, name: str) -> None:
        (self.fake / f"open-{name}").write_text("")

    def dmesg(self) -> str:
        p = self.fake / "dmesg"
        return p.read_text() if p.exists() else ""

    def log(self, line: str) -> None:
        with open(self.fake / "dmesg", "a") as f:
            f.write(line + "\n")

    def expose(self, pid: int) -> None:
        """Make a real process visible in the tree's /proc (a link to the real /proc/<pid>:
        its fds, and it is gone when the process is)."""
        link = self.root.proc(str(pid))
        if not link.is_symlink():
            link.symlink_to(f"/proc/{pid}")

    def open_vfio(self, group: int):
        """A process holding /dev/vfio/<group> open, as QEMU does while it runs, until
        it is told to stop (`proc.terminate(); proc.wait()`; not by closing a pipe: the
        hook's forked writers inherit the test's end of it)."""
        import subprocess
        import sys

        node = self.root.dev("vfio", str(group))
        proc = subprocess.Popen(
            [sys.executable, "-c", "import signal, sys; f = open(sys.argv[1]);"
             " print('open', flush=True); signal.pause()", str(node)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "open\n"
        self.expose(proc.pid)
        return proc

    def vfio_openers(self, group: int) -> list[int]:
        """Real processes with /dev/vfio/<group> of this tree open."""
        node = str(self.root.dev("vfio", str(group)))
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fds = os.listdir(f"/proc/{entry}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{entry}/fd/{fd}") == node:
                        pids.append(int(entry))
                        break
                except OSError:
                    continue
        return pids

    def driver_of(self, addr: str) -> str | None:
        link = self.device_dir(addr) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def namespaces_of(self, addr: str) -> list[str]:
        """Block devices (namespaces and partitions) under the controller, by name."""
        ndir = self.device_dir(addr) / "nvme"
        if not ndir.exists():
            return []
        return sorted(p.parent.name for p in ndir.rglob("dev"))

    # -- other functions in a group: bridges, disks, NICs, multipath ------------
    def secondary_bus(self, addr: str, bus: str | None = None) -> None:
        """Give a bridge the pci_bus/ directory the kernel creates for the bus behind it."""
        bus = bus or addr[:5] + f"{int(addr[5:7], 16) + 1:02x}"
        (self.device_dir(addr) / "pci_bus" / bus).mkdir(parents=True, exist_ok=True)

    def add_scsi_disk(self, addr: str, name: str, partitions: int = 0,
                      major: int = 8) -> None:
        """A disk behind a storage controller (AHCI, SAS, USB): <pci>/ata1/host0/
        target0:0:0/0:0:0:0/block/<name>, with its /dev node and udev entry."""
        state = self._state()
        n = state.setdefault("next_scsi", 0)
        state["next_scsi"] = n + 1
        bdir = (self.device_dir(addr) / f"ata{n + 1}" / f"host{n}" / f"target{n}:0:0"
                / f"{n}:0:0:0" / "block" / name)
        for p in range(partitions + 1):
            pname = name if p == 0 else f"{name}{p}"
            pdir = bdir if p == 0 else bdir / pname
            pdir.mkdir(parents=True)
            (pdir / "dev").write_text(f"{major}:{16 * n + p}\n")
            (pdir / "size").write_text("524288\n")
            (pdir / "holders").mkdir()
            if p:
                (pdir / "partition").write_text(f"{p}\n")
            else:
                _rel_link(self.sys / "block" / name, pdir)
            _rel_link(self.sys / "class/block" / pname, pdir)
            self.root.dev(pname).write_text("")
            self.root.run("udev/data", f"b{major}:{16 * n + p}").write_text(
                f"E:DEVNAME=/dev/{pname}\n")
        self._save_state(state)

    def add_netif(self, addr: str, name: str, *, up: bool = False, ipv4: tuple = (),
                  ipv6: tuple = (), master: str | None = None, uppers: tuple = ()) -> None:
        """A network interface of the PCI function: <pci>/net/<name>, /sys/class/net/<name>;
        ipv4 addresses as the fake kernel's SIOCGIFCONF shows them, ipv6 (hex, scope)
        in /proc/net/if_inet6."""
        ndir = self.device_dir(addr) / "net" / name
        ndir.mkdir(parents=True)
        (ndir / "flags").write_text("0x1003\n" if up else "0x1002\n")
        (ndir / "operstate").write_text("up\n" if up else "down\n")
        _rel_link(self.sys / "class/net" / name, ndir)
        for other in (master, *uppers):
            if other and not (self.sys / "devices/virtual/net" / other).exists():
                (self.sys / "devices/virtual/net" / other).mkdir(parents=True)
                _rel_link(self.sys / "class/net" / other, self.sys / "devices/virtual/net" / other)
        if master:
            _rel_link(ndir / "master", self.sys / "devices/virtual/net" / master)
        for upper in uppers:
            _rel_link(ndir / f"upper_{upper}", self.sys / "devices/virtual/net" / upper)
        path = self.fake / "ipv4.json"
        table = json.loads(path.read_text()) if path.exists() else {}
        if ipv4:
            table[name] = list(ipv4)
        path.write_text(json.dumps(table))
        self.root.proc("net").mkdir(parents=True, exist_ok=True)
        with open(self.root.proc("net/if_inet6"), "a") as f:
            for hexaddr, scope in ipv6:
                f.write(f"{hexaddr} 02 40 {scope:02x} 80 {name:>8}\n")

    def multipath(self, addrs: list[str], subsys: int = 9, nsid: int = 1) -> str:
        """One namespace shared by the NVMe controllers at `addrs` (bound to nvme, built
        without namespaces) through native multipath: a head nvme<S>n<nsid> under
        /sys/devices/virtual/nvme-subsystem/nvme-subsys<S>, a hidden path
        nvme<S>c<C>n<nsid> under each controller, the controllers linked in the
        subsystem. Returns the head's name."""
        sub = self.sys / "devices/virtual/nvme-subsystem" / f"nvme-subsys{subsys}"
        sub.mkdir(parents=True, exist_ok=True)
        _rel_link(self.sys / "class/nvme-subsystem" / f"nvme-subsys{subsys}", sub)
        head = f"nvme{subsys}n{nsid}"
        state = self._state()
        self._add_block(sub / head, head, state, {"serial": f"MP{subsys}"}, None)
        self._save_state(state)
        for addr in addrs:
            (ctrl,) = os.listdir(self.device_dir(addr) / "nvme")
            cdir = self.device_dir(addr) / "nvme" / ctrl
            _rel_link(sub / ctrl, cdir)
            (cdir / f"nvme{subsys}c{ctrl[4:]}n{nsid}").mkdir()
        return head

    def open_file(self, pid: int, target: str, comm: str = "sleep",
                  cmdline: list[str] | None = None) -> None:
        """Process `pid` holds `target` open: /proc/<pid>/fd/<n> -> target, as the kernel
        shows it (an absolute path such as /dev/nvme0n1, or socket:[123])."""
        p = self.root.proc(str(pid))
        (p / "fd").mkdir(parents=True, exist_ok=True)
        (p / "comm").write_text(comm + "\n")
        (p / "cmdline").write_bytes(b"\0".join(a.encode() for a in (cmdline or [comm])) + b"\0")
        n = len(os.listdir(p / "fd"))
        os.symlink(target, p / "fd" / str(n))

    def exit_process(self, pid: int) -> None:
        shutil.rmtree(self.root.proc(str(pid)), ignore_errors=True)

    def qemu_pidfile(self, vmid: int, pid: int) -> None:
        """qemu-server's /run/qemu-server/<vmid>.pid of a running VM."""
        self.root.run("qemu-server", f"{vmid}.pid").write_text(f"{pid}\n")

    # -- drive identity (issue 13): config space, nvme attributes, boots -------------------
    # Added at the end of the class, wrapping add_pci and _create_controller, so the
    # edits stay apart from the fake kernel's write logic above and below.
    _add_pci_plain = add_pci
    _create_controller_plain = _create_controller

    def add_pci(self, addr: str, **kw) -> Path:
        d = self._add_pci_plain(addr, **kw)
        self._write_config(addr)
        return d

    def _write_config(self, addr: str) -> None:
        """4 KiB of config space: the header's ids and class, then the extended
        capabilities (PCIe base spec 7.9.3) given by set_dsn."""
        d = self.device_dir(addr)
        spec = self._spec(addr)
        cfg = bytearray(4096)
        cfg[0:2] = int((d / "vendor").read_text(), 16).to_bytes(2, "little")
        cfg[2:4] = int((d / "device").read_text(), 16).to_bytes(2, "little")
        cfg[9:12] = int((d / "class").read_text(), 16).to_bytes(3, "little")
        dsn = spec.get("dsn")
        if dsn is not None:
            # an AER capability first, as on real drives, then the DSN at 0x148
            cfg[0x100:0x104] = (0x0001 | 2 << 16 | 0x148 << 20).to_bytes(4, "little")
            cfg[0x148:0x14C] = (0x0003 | 1 << 16).to_bytes(4, "little")
            cfg[0x14C:0x154] = dsn.to_bytes(8, "little")
        (d / "config").write_bytes(bytes(cfg))

    def set_dsn(self, addr: str, dsn: int | None) -> None:
        """Give the device a PCIe Device Serial Number capability (None: none)."""
        spec = self._spec(addr)
        spec["dsn"] = dsn
        (self.fake / f"{addr}.json").write_text(json.dumps(spec))
        self._write_config(addr)

    def set_identity(self, addr: str, **ident) -> None:
        """What the controller reports: model, firmware, subsysnqn; nguid/eui/uuid of its
        namespaces (a list, one per namespace). Applied now and at every nvme probe."""
        spec = self._spec(addr)
        spec.setdefault("identity", {}).update(ident)
        (self.fake / f"{addr}.json").write_text(json.dumps(spec))
        ndir = self.device_dir(addr) / "nvme"
        for cdir in ndir.iterdir() if ndir.is_dir() else []:
            self._write_identity(cdir, spec)

    def _create_controller(self, addr: str, d: Path, spec: dict) -> None:
        self._create_controller_plain(addr, d, spec)
        for cdir in (d / "nvme").iterdir():
            self._write_identity(cdir, spec)

    def _write_identity(self, cdir: Path, spec: dict) -> None:
        ident = spec.get("identity", {})
        (cdir / "model").write_text(ident.get("model", "QEMU NVMe Ctrl") + "\n")
        (cdir / "firmware_rev").write_text(ident.get("firmware", "1.0") + "\n")
        (cdir / "subsysnqn").write_text(
            ident.get("subsysnqn", f"nqn.2019-08.org.qemu:{spec['serial']}") + "\n")
        for ns in sorted(p for p in cdir.iterdir() if (p / "wwid").exists()):
            i = int(ns.name.rsplit("n", 1)[1])
            (ns / "nsid").write_text(f"{i}\n")
            for name in ("nguid", "eui", "uuid"):
                values = ident.get(name) or []
                if i <= len(values) and values[i - 1]:
                    (ns / name).write_text(values[i - 1] + "\n")

    def boot(self, boot_id: str) -> None:
        """/proc/sys/kernel/random/boot_id: a new value is a new boot."""
        p = self.root.proc("sys/kernel/random/boot_id")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(boot_id + "\n")

    def renumber(self, a: str, b: str, boot_id: str = "after-renumbering") -> None:
        """A reboot after which the drives at `a` and `b` trade addresses (a BIOS update,
        a card moved): serials, namespaces, identities and DSNs swap, drivers stay."""
        with self._kernel_lock():
            bound = {x: self.driver_of(x) for x in (a, b)}
            for x in (a, b):
                if bound[x] == "nvme":
                    self._remove_controller(self.device_dir(x))
            sa, sb = self._spec(a), self._spec(b)
            for k in ("serial", "namespaces", "identity", "dsn"):
                sa[k], sb[k] = sb.get(k), sa.get(k)
            for x, spec in ((a, sa), (b, sb)):
                spec = {k: v for k, v in spec.items() if v is not None}
                (self.fake / f"{x}.json").write_text(json.dumps(spec))
                self._write_config(x)
            for x in (a, b):
                if bound[x] == "nvme":
                    self._create_controller(x, self.device_dir(x), self._spec(x))
        self.boot(boot_id)


class FakeKernel(Kernel):
    """Performs writes on a FakeHost tree the way the kernel reacts to them."""

    def __init__(self, host: FakeHost):
        self.host = host

    def _fault(self, addr: str, op: str, driver: str) -> bool:
        """Apply a configured fault; True means "do nothing"."""
        faults = self.host._state()["faults"].get(addr, {})
        kind, value = faults.get(f"{op}:{driver}", faults.get(op, [None, 0]))
        if kind == "errno":
            raise OSError(value, os.strerror(value))
        if kind == "delay":
            time.sleep(value)
        if kind == "gate":
            (self.host.fake / f"at-{value}").write_text(str(os.getpid()))
            while not (self.host.fake / f"open-{value}").exists():
                time.sleep(0.01)
        return kind == "ignore"

    def _wait_vfio_released(self, addr: str) -> None:
        """vfio-pci's remove waits until every opener of the group has closed it."""
        group = self.host._spec(addr)["group"]
        if group is None:
            return
        said = False
        while pids := self.host.vfio_openers(group):
            if not said:
                self.host.log(f"vfio-pci {addr}: Device is currently in use, task"
                              f" {os.getpid()} blocked until device is released"
                              f" (openers: {pids})")
                said = True
            time.sleep(0.01)

    def write(self, path: Path, value: str) -> None:
        path = Path(path)
        sys = self.host.sys
        rel = path.relative_to(sys)
        parts = rel.parts
        if parts[-1] == "driver_override":
            if not path.exists():
                raise OSError(errno.ENOENT, "no such device")
            v = value.strip()
            self._fault(path.parent.name, "override", v)
            path.write_text((v or "(null)") + "\n")
        elif parts[:3] == ("bus", "pci", "drivers") and parts[-1] in ("unbind", "bind"):
            driver, addr = parts[3], value.strip()
            d = self.host.device_dir(addr)
            if parts[-1] == "unbind":
                if self.host.driver_of(addr) != driver:
                    raise OSError(errno.ENODEV, "not bound to this driver")
                if not self._fault(addr, "unbind", driver):
                    if driver == "vfio-pci":
                        self._wait_vfio_released(addr)
                    self.host.detach(addr)
            else:
                if self.host.driver_of(addr) is not None:
                    raise OSError(errno.EBUSY, "already bound")
                if not self._matches(driver, addr):  # pci_bus_match: override, or an id
                    raise OSError(errno.ENODEV, f"{driver} does not match {addr}")
                if not self._fault(addr, "probe", driver):  # bind runs the driver's probe
                    self.host.attach(addr, driver)
        elif parts[:3] == ("bus", "pci", "drivers") and parts[-1] == "new_id":
            ids = sys / "bus/pci/drivers" / parts[3] / "fake_ids"
            with open(ids, "a") as f:
                f.write(value.strip() + "\n")
        elif rel == Path("bus/pci/drivers_probe"):
            addr = value.strip()
            if self.host.driver_of(addr) is not None:
                return
            chosen = self._match(addr)
            if chosen and not self._fault(addr, "probe", chosen):
                self.host.attach(addr, chosen)
        else:
            raise OSError(errno.EACCES, f"fake kernel does not know {rel}")

    def _matches(self, driver: str, addr: str) -> bool:
        """Does `driver` match the device (drivers/pci/pci-driver.c pci_match_device)?
        With driver_override set, only that driver does (whatever its ids); else a
        driver whose static table has the device (the class's usual driver, here) or
        whose dynamic ids (new_id) have its vendor:device."""
        d = self.host.device_dir(addr)
        if not (self.host.sys / "bus/pci/drivers" / driver).is_dir():
            return False
        override = (d / "driver_override").read_text().strip()
        if override != "(null)":
            return override == driver
        if self.host._spec(addr)["default_driver"] == driver:
            return True
        vd = "{:04x} {:04x}".format(int((d / "vendor").read_text(), 16),
                                    int((d / "device").read_text(), 16))
        ids = self.host.sys / "bus/pci/drivers" / driver / "fake_ids"
        return ids.exists() and vd in ids.read_text().splitlines()

    def _match(self, addr: str) -> str | None:
        """The driver drivers_probe binds: the first that matches (nvme before vfio-pci,
        as nvme is loaded first)."""
        drivers = self.host.sys / "bus/pci/drivers"
        override = (self.host.device_dir(addr) / "driver_override").read_text().strip()
        if override != "(null)":
            return override if self._matches(override, addr) else None
        default = self.host._spec(addr)["default_driver"]
        names = [default] if default else []
        names += sorted(n.name for n in drivers.iterdir() if n.name != default)
        return next((n for n in names if self._matches(n, addr)), None)

    def open_exclusive(self, path: Path) -> None:
        if Path(path).name in self.host._state()["busy"]:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        super().open_exclusive(path)

    def load_module(self, name: str) -> None:
        self.host.add_driver(name.replace("_", "-"))

    def ipv4_addresses(self) -> dict[str, list[str]]:
        path = self.host.fake / "ipv4.json"
        return json.loads(path.read_text()) if path.exists() else {}


class FakeLater:
    """Stands in for pvehook.later.Later: keeps each scheduled release; `fire` runs them
    now, in this process, against the test's context (its fake kernel)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[int, str, float]] = []  # (vmid, generation, delay)

    def release_after(self, ctx, vmid: int, generation: str, delay: float) -> str:
        self.jobs.append((vmid, generation, delay))
        return f"fake timer {len(self.jobs)}"

    def fire(self, ctx) -> list[int]:
        """Run every job scheduled so far (time has passed); their exit codes."""
        from pvehook.errors import PvehookError
        from pvehook.release import deferred_release

        jobs, self.jobs = self.jobs, []
        codes = []
        for vmid, generation, _delay in jobs:
            try:
                deferred_release(ctx, vmid, generation)
                codes.append(0)
            except PvehookError as e:
                codes.append(e.exit_code)
        return codes


# -- what the tests of the hook build and read most ------------------------------------

def nvme(host: FakeHost, addr: str = "0000:01:00.0", group: int | None = 1,
         partitions: int = 2, **kw) -> Path:
    """An NVMe controller with one namespace of `partitions` partitions, serial S-<addr>."""
    kw.setdefault("namespaces", [FakeNamespace(partitions=partitions)])
    return host.add_pci(addr, group=group, serial=f"S-{addr}", **kw)


def record(host: FakeHost, vmid: int) -> dict | None:
    """VM `vmid`'s undo record as the hook left it in /run/pvehook, or None."""
    p = host.root.state_dir / f"{vmid}.json"
    return json.loads(p.read_text()) if p.exists() else None


def start_together(ctx, vmids, phase: str = "pre-start") -> list[int]:
    """Run the hook's `phase` for these VMs at once, one forked process each (stdout to
    /dev/null); their exit codes, in the order of `vmids`."""
    from pvehook.hook import run

    pids = []
    for vmid in vmids:
        pid = os.fork()
        if pid == 0:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os._exit(run([str(vmid), phase], ctx))
        pids.append(pid)
    return [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
