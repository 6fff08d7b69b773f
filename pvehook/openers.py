"""Who has a block device open: every process's open files, read as fuser reads them.

QEMU opens a disk given by path (`scsi1: /dev/nvme0n1`) without O_EXCL, so the
exclusive-open probe cannot see it; only /proc/<pid>/fd can. The hook runs at every VM
start, so one `Openers` scans /proc once, lazily, for every disk of the run, and keeps
only what can be a block device:

- sockets, pipes, anon inodes, the kernel's character devices and the filesystems
  mounted under /dev (/dev/shm, /dev/pts...) are skipped by name;
- in our mount namespace, a path outside /dev is skipped (block device nodes live in
  /dev), and "/dev/<name>" with the name of a block device in /sys/class/block is that
  device (devtmpfs names its nodes after the kernel's devices; /dev/mapper and
  /dev/disk/by-id names are symlinks the kernel's link already resolved);
- any other path (a node made by hand, a deleted node, every path of a process in
  another mount namespace: a container) is stat'ed (the open file itself), once per
  path and mount namespace, and kept when it is a block device. A block device node
  made outside /dev in our own namespace is not seen.

An opener that closes within GRACE_S (udev's blkid, an LVM label scan) is not a holder.

VM configs that name a disk by path (qemu-server opens it at start) are read here too.
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections import namedtuple

from .paths import Root

# Character devices the kernel names, and filesystems mounted under /dev: never a disk.
_SKIP = frozenset((
    "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/ptmx",
    "/dev/console", "/dev/kmsg", "/dev/kvm", "/dev/fuse", "/dev/net/tun", "/dev/rfkill",
    "/dev/vhost-net", "/dev/vhost-vsock", "/dev/autofs", "/dev/rtc0",
))
_SKIP_PREFIXES = ("/dev/pts/", "/dev/shm/", "/dev/mqueue/", "/dev/hugepages/", "/dev/tty",
                  "/dev/vfio/", "/dev/dri/", "/dev/input/", "/dev/snd/", "/dev/watchdog",
                  "/dev/hidraw", "/dev/nvme-fabrics", "/dev/ng")
# A process that closes the disk within this many seconds of the scan (udev's blkid, an
# LVM label scan by pvestatd's `lvs`) only looked at it: it does not make the disk "in
# use". One deadline for the whole run; only a run that found an opener waits.
GRACE_S = 1.0
_POLL_S = 0.05
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_ID_RE = re.compile(r"^[0-9]+$")


def _blockdev(fd: str, fd_dir: int) -> str | None:
    """major:minor of the open file when it is a block device (stat of the fd: the open
    file itself, whatever its path now names)."""
    try:
        st = os.stat(fd, dir_fd=fd_dir)
    except OSError:
        return None
    if stat.S_ISBLK(st.st_mode):
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return None


class Process(namedtuple("Process", "pid comm vmid qemu_name", defaults=(None,))):
    """`vmid`: the VM whose QEMU this is, else None; `qemu_name`: the -name of a QEMU
    that no VM owns."""

    __slots__ = ()

    def describe(self) -> str:
        if self.vmid is not None:
            return f"pid {self.pid} ({self.comm}), the QEMU of running VM {self.vmid}"
        if self.qemu_name is not None:
            return f"pid {self.pid} ({self.comm}), a QEMU named {self.qemu_name!r}"
        return f"pid {self.pid} ({self.comm})"


class ConfigDisk(namedtuple("ConfigDisk", "vmid key path running")):
    __slots__ = ()


class Openers:
    """One run's view of who has which block device open. Scans on first use."""

    def __init__(self, root: Root, grace: float = GRACE_S, sleep=time.sleep):
        self.root = root
        self.grace = grace
        self._sleep = sleep
        self._deadline: float | None = None
        self._by_name: dict[str, set[int]] | None = None
        self._by_devnum: dict[str, set[int]] = {}
        self._blocks: set[str] = set()
        self._my_ns: str | None = None
        self._seen: dict[tuple[str, str], str | None] = {}  # (mount ns, path) -> devnum
        self.unreadable = 0  # processes whose fds we may not read (not root)
        self._qemu_pids: dict[int, int] | None = None
        self._configs: list[tuple[int, str, str]] | None = None

    # -- /proc ------------------------------------------------------------------------
    def _scan(self) -> None:
        try:
            self._blocks = set(os.listdir(self.root.sys("class", "block")))
        except FileNotFoundError:
            self._blocks = set()
        try:
            self._my_ns = os.readlink(self.root.proc("self", "ns", "mnt"))
        except OSError:
            self._my_ns = None
        by_name: dict[str, set[int]] = {}
        by_devnum: dict[str, set[int]] = {}
        me = str(os.getpid())
        try:
            proc = os.open(self.root.proc(), _DIR)
        except FileNotFoundError:
            self._by_name = by_name
            return
        try:
            for entry in os.listdir(proc):
                if not entry.isdigit() or entry == me:
                    continue
                found = self._open_blocks(proc, entry)
                if found is None:
                    self.unreadable += 1
                    continue
                for name in found[0]:
                    by_name.setdefault(name, set()).add(int(entry))
                for num in found[1]:
                    by_devnum.setdefault(num, set()).add(int(entry))
        finally:
            os.close(proc)
        self._by_name, self._by_devnum = by_name, by_devnum

    def _open_blocks(self, proc: int, entry: str) -> tuple[list[str], list[str]] | None:
        """(kernel names, major:minor) of the block devices process `entry` has open;
        None when its open files may not be read (not root)."""
        try:
            fd_dir = os.open(f"{entry}/fd", _DIR, dir_fd=proc)
        except PermissionError:
            return None
        except OSError:  # gone meanwhile
            return [], []
        names: list[str] = []
        nums: list[str] = []
        ns: str | None | bool = False  # its mount namespace, read on first need
        readlink = os.readlink
        try:
            for fd in os.listdir(fd_dir):
                try:
                    link = readlink(fd, dir_fd=fd_dir)
                except OSError:
                    continue
                if link[:1] != "/" or link in _SKIP or link.startswith(_SKIP_PREFIXES):
                    continue  # sockets, pipes, anon inodes; character devices
                if ns is False:
                    try:
                        ns = readlink(f"{entry}/ns/mnt", dir_fd=proc)
                    except OSError:
                        ns = None
                if ns == self._my_ns:
                    # Our mount namespace: block device nodes live in /dev, devtmpfs
                    # names them after the kernel's devices.
                    if not link.startswith("/dev/"):
                        continue
                    if link[5:] in self._blocks:
                        names.append(link[5:])
                        continue
                # Another mount namespace (a container, a service with a private /dev)
                # shows paths of its own: /dev/sdb there, or /newroot/dev/x, may be our
                # nvme0n1. Only st_rdev tells.
                # One path names one file within a mount namespace (a replaced node reads
                # "... (deleted)"): stat each path once per namespace.
                key = (ns or entry, link)
                if key not in self._seen:
                    self._seen[key] = _blockdev(fd, fd_dir)
                if self._seen[key] is not None:
                    nums.append(self._seen[key])
        except OSError:
            pass
        finally:
            os.close(fd_dir)
        return names, nums

    def pids(self, name: str, devnum: str | None) -> set[int]:
        """Processes holding the block device `name` (kernel name, major:minor `devnum`)
        open, and still holding it when the grace is over."""
        if self._by_name is None:
            self._scan()
        assert self._by_name is not None
        found = set(self._by_name.get(name, ()))
        if devnum is not None:
            found |= self._by_devnum.get(devnum, set())
        if not found:
            return found
        if self._deadline is None:
            self._deadline = time.monotonic() + self.grace
        while True:
            found = {pid for pid in found if self._holds(pid, name, devnum)}
            if not found or time.monotonic() >= self._deadline:
                return found
            self._sleep(_POLL_S)

    def _holds(self, pid: int, name: str, devnum: str | None) -> bool:
        try:
            proc = os.open(self.root.proc(), _DIR)
        except OSError:
            return False
        try:
            names, nums = self._open_blocks(proc, str(pid)) or ([], [])
        finally:
            os.close(proc)
        return name in names or (devnum is not None and devnum in nums)

    def process(self, pid: int) -> Process:
        try:
            comm = self.root.proc(str(pid), "comm").read_text().strip()
        except OSError:
            comm = "?"
        vmid = self.vmid_of(pid)
        return Process(pid, comm, vmid, None if vmid is not None else self._qemu_name(pid))

    # -- QEMU of Proxmox VMs ----------------------------------------------------------
    def _pidfiles(self) -> dict[int, int]:
        """pid -> vmid from qemu-server's pid files (/run/qemu-server/<vmid>.pid)."""
        if self._qemu_pids is None:
            self._qemu_pids = {}
            try:
                names = os.listdir(self.root.run("qemu-server"))
            except OSError:
                names = []
            for n in names:
                vmid, _, ext = n.partition(".")
                if ext != "pid" or not _ID_RE.match(vmid):
                    continue
                try:
                    pid = int(self.root.run("qemu-server", n).read_text().strip())
                except (OSError, ValueError):
                    continue
                self._qemu_pids[pid] = int(vmid)
        return self._qemu_pids

    def vmid_of(self, pid: int) -> int | None:
        """The VM whose QEMU `pid` is: its pid file, else `-id <vmid>` on its command line
        (qemu-server's config_to_command puts it right after the binary)."""
        if pid in self._pidfiles():
            return self._pidfiles()[pid]
        try:
            args = self.root.proc(str(pid), "cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        for flag, value in zip(args, args[1:]):
            if flag == b"-id" and value.isdigit():
                return int(value)
        return None

    def _qemu_name(self, pid: int) -> str | None:
        """`-name <name>[,opts]` of a QEMU started without qemu-server."""
        try:
            args = self.root.proc(str(pid), "cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        for flag, value in zip(args, args[1:]):
            if flag in (b"-name", b"--name"):
                name = value.decode(errors="replace").split(",")[0]
                return name[len("guest="):] if name.startswith("guest=") else name
        return None

    def running(self, vmid: int) -> bool:
        from .holds import vm_running

        return vm_running(self.root, vmid)

    # -- VM configs that name a disk by path --------------------------------------------
    def _config_paths(self) -> list[tuple[int, str, str]]:
        """(vmid, key, /dev path) for every disk given by device path in the main section
        of this node's VM configs."""
        if self._configs is None:
            from .vmconfig import DISK_KEYS, Disk

            keys = set(DISK_KEYS)
            self._configs = []
            d = self.root.pve("qemu-server")
            try:
                names = sorted(os.listdir(d))
            except OSError:
                names = []
            for n in names:
                vmid, _, ext = n.partition(".")
                if ext != "conf" or not _ID_RE.match(vmid):
                    continue
                try:
                    text = (d / n).read_text(errors="replace")
                except OSError:
                    continue
                for line in text.split("\n"):
                    if line.startswith("["):
                        break  # only the main section is what a start uses
                    key, sep, value = line.partition(":")
                    if not sep or key not in keys or "/dev/" not in value:
                        continue
                    try:
                        disk = Disk.parse(key, value.strip())
                    except Exception:  # a malformed line: qemu-server would refuse it
                        continue
                    if disk.is_device_path:
                        self._configs.append((int(vmid), key, disk.volume))
        return self._configs

    def _resolve(self, path: str) -> tuple[str | None, str | None]:
        """(kernel name, devnum) of a /dev path, through the root."""
        p = self.root.dev(*[x for x in path[5:].split("/") if x])
        real = os.path.realpath(p)
        name = os.path.basename(real) if os.path.dirname(real) == os.path.realpath(
            self.root.dev()) else None
        try:
            st = os.stat(real)
        except OSError:
            return name, None
        if stat.S_ISBLK(st.st_mode):
            return name, f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        return name, None

    def configs_naming(self, name: str, devnum: str | None) -> list[ConfigDisk]:
        out = []
        for vmid, key, path in self._config_paths():
            n, num = self._resolve(path)
            if n == name or (num is not None and num == devnum):
                out.append(ConfigDisk(vmid, key, path, self.running(vmid)))
        return out
