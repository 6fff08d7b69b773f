"""The undo record of one VM, and the per-device locks.

/run/pvehook/<vmid>.json says, per device the hook moved for that VM, which driver it came
from. It is written atomically *before* each change, so a hook killed halfway leaves a
record post-stop can act on. /run is a tmpfs: a reboot clears it, as it should.

Records and locks live only in directories of our own: /run/pvehook and
/run/pvehook/locks, owned by the user running the hook (root), mode 0700, every file
opened relative to the directory's descriptor without following links. /run itself is
root's, so no other user can create them first; one that exists but belongs to someone
else, or is a link, is refused (never used, never changed), and one of ours with wider
permissions is narrowed to 0700. Not /run/lock: that directory is world-writable, and
whoever creates /run/lock/pvehook first owns what goes in it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .errors import HeldByOtherVMError, PvehookError, StateDirError
from .hook import is_vmid
from .paths import Root

_ADDRESS_RE = re.compile(r"[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# -- directories and files of our own ---------------------------------------------------------

def _owner(uid: int) -> str:
    import pwd  # a C module; only on this error path

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _refuse(path: Path, why: str) -> StateDirError:
    return StateDirError(
        f"{path} {why}: pvehook keeps its locks and records only in a directory of its own"
        " (owned by root, mode 0700) and has left this one as it is",
        hint=f"find out who created it, then remove it (`rm -rf {path}`); pvehook creates it"
             " again at the next start")


def _open_dir(parent_fd: int, name: str, path: Path, create: bool) -> int | None:
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            pass
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as e:  # ELOOP: a symbolic link; ENOTDIR: something else
        raise _refuse(path, "is a symbolic link" if os.path.islink(path) else
                      f"is not a directory ({e.strerror})") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise _refuse(path, f"belongs to {_owner(st.st_uid)}, not to {_owner(os.geteuid())}")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.fchmod(fd, 0o700)  # ours (an older pvehook made it 0755): narrow it
    return fd


def open_state_dir(root: Root, *sub: str, create: bool = True) -> int | None:
    """An O_DIRECTORY descriptor of /run/pvehook (or a directory under it), created when
    missing; None when it is missing and create is false. Raises StateDirError for a
    directory that is not ours alone."""
    top = root.state_dir.parent  # /run: root's, 0755
    if create:
        top.mkdir(parents=True, exist_ok=True)  # (a fresh test tree)
    try:
        parent: int | None = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    path = top
    try:
        for name in (root.state_dir.name, *sub):
            path = path / name
            fd = _open_dir(parent, name, path, create)
            os.close(parent)
            parent = fd
            if fd is None:
                return None
        fd, parent = parent, None
        return fd
    finally:
        if parent is not None:
            os.close(parent)


def _open_own_file(dir_fd: int, name: str, path: Path, flags: int) -> int:
    """Open a regular file of ours in one of our directories, never through a link."""
    # O_NONBLOCK: a FIFO in its place must not hang the hook (fstat refuses it below).
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):
            raise _refuse(path, "is a symbolic link or not a regular file") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise _refuse(path, f"is not a regular file of {_owner(os.geteuid())}")
    return fd


# -- the records --------------------------------------------------------------------------------

def boot_id(root: Root) -> str | None:
    """This boot's id: a record written in another boot is stale."""
    try:
        return root.proc("sys", "kernel", "random", "boot_id").read_text().strip()
    except OSError:
        return None


def boottime() -> float:
    """Seconds since boot, suspend included; an NTP step does not move it (time.time does)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class DeviceRecord:
    def __init__(self, address: str, original_driver: str | None, namespaces: int = 0):
        self.address = address
        self.original_driver = original_driver  # None: it had no driver
        self.namespaces = namespaces  # how many namespaces to wait for when it comes back

    def to_json(self) -> dict:
        return {"address": self.address, "original_driver": self.original_driver,
                "namespaces": self.namespaces}

    @classmethod
    def from_json(cls, d: dict) -> "DeviceRecord":
        addr, drv, ns = d["address"], d["original_driver"], d.get("namespaces", 0)
        if (not isinstance(addr, str) or not _ADDRESS_RE.fullmatch(addr)
                or not (drv is None or isinstance(drv, str) and drv.isprintable() and drv
                        and "/" not in drv)
                or not isinstance(ns, int)):
            raise ValueError(f"malformed device entry {d!r}")
        return cls(addr.lower(), drv, ns)


class VmRecord:
    def __init__(self, vmid: int, devices: list[DeviceRecord] | None = None,
                 written: float = 0.0, boot_id: str | None = None, boottime: float = 0.0,
                 generation: str | None = None, kept_for_reboot: float | None = None):
        self.vmid = vmid
        self.devices = devices if devices is not None else []
        self.written = written  # wall clock, for people reading the file
        self.boot_id = boot_id  # with boottime: when, for the grace period (holds.py)
        self.boottime = boottime
        # Which pre-start wrote it (restarts.new_generation): a deferred give-back acts
        # only on the record of the start that scheduled it.
        self.generation = generation
        # When post-stop kept the devices on vfio-pci for a reboot (epoch seconds).
        self.kept_for_reboot = kept_for_reboot

    def to_json(self) -> dict:
        out = {"vmid": self.vmid, "devices": [d.to_json() for d in self.devices],
               "written": self.written, "boot_id": self.boot_id, "boottime": self.boottime}
        if self.generation is not None:
            out["generation"] = self.generation
        if self.kept_for_reboot is not None:
            out["kept_for_reboot"] = self.kept_for_reboot
        return out

    def find(self, address: str) -> DeviceRecord | None:
        return next((d for d in self.devices if d.address == address), None)


class CorruptRecordError(PvehookError):
    """A record that cannot be read; `addresses`: every PCI address its text names."""

    exit_code = 1

    def __init__(self, path: Path, vmid: int, why: str, text: str = ""):
        self.path, self.vmid = path, vmid
        self.addresses = sorted({a.lower() for a in _ADDRESS_RE.findall(text)})
        names = (f" it names {', '.join(self.addresses)}" if self.addresses
                 else " it names no PCI address")
        super().__init__(
            f"pvehook's record {path} (VM {vmid}) cannot be read ({why});{names}",
            hint=f"pvehook cannot tell which devices it moved for VM {vmid}: check that VM;"
                 " once it is stopped, give back by hand what the file names and remove it")


class Records:
    """The undo records of every VM, under /run/pvehook (one <vmid>.json each)."""

    def __init__(self, root: Root):
        self.root = root
        self.dir = root.state_dir

    def _path(self, vmid: int) -> Path:
        return self.dir / f"{vmid}.json"

    def _load_at(self, dir_fd: int, vmid: int) -> VmRecord | None:
        path = self._path(vmid)
        try:
            fd = _open_own_file(dir_fd, path.name, path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except StateDirError:
            raise CorruptRecordError(path, vmid, "a link, or not a regular file of root's"
                                     ) from None
        with os.fdopen(fd, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8", "replace")
        try:
            data = json.loads(text)
            if data["vmid"] != vmid:
                raise ValueError(f"it says VM {data['vmid']!r}")
            rec = VmRecord(vmid, [DeviceRecord.from_json(d) for d in data["devices"]],
                           float(data.get("written", 0.0)), data.get("boot_id"),
                           float(data.get("boottime", 0.0)), data.get("generation"),
                           data.get("kept_for_reboot"))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            why = "not JSON" if isinstance(e, json.JSONDecodeError) else f"{type(e).__name__}: {e}"
            raise CorruptRecordError(path, vmid, why, text) from None
        return rec

    def load(self, vmid: int) -> VmRecord | None:
        """VM `vmid`'s record, None without one; CorruptRecordError when unreadable."""
        dir_fd = open_state_dir(self.root, create=False)
        if dir_fd is None:
            return None
        try:
            return self._load_at(dir_fd, vmid)
        finally:
            os.close(dir_fd)

    def save(self, record: VmRecord) -> None:
        dir_fd = open_state_dir(self.root)
        try:
            self._save_at(dir_fd, record)
        finally:
            os.close(dir_fd)

    def _save_at(self, dir_fd: int, record: VmRecord) -> None:
        name = f"{record.vmid}.json"
        if not record.devices:
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            return
        record.written = time.time()
        record.boot_id = boot_id(self.root)
        record.boottime = boottime()
        # Our own temporary name (tempfile costs more to import than the whole write);
        # the pid in it keeps two hook runs from sharing one.
        tmp = f".{record.vmid}.{os.getpid()}.tmp"
        try:
            os.unlink(tmp, dir_fd=dir_fd)  # left by a killed run with our pid
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
        with os.fdopen(fd, "w") as f:
            json.dump(record.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    @contextmanager
    def modify(self, vmid: int, timeout: float = 60.0) -> Iterator[VmRecord]:
        """Load VM `vmid`'s record (a new one if none) under its record lock, let the
        caller change it, save it. Every rewrite of a record goes through here, so a run
        rewriting another VM's record and that VM's own run do not undo each other."""
        with record_lock(self.root, vmid, timeout):
            dir_fd = open_state_dir(self.root)
            try:
                record = self._load_at(dir_fd, vmid) or VmRecord(vmid)
                yield record
                self._save_at(dir_fd, record)
            finally:
                os.close(dir_fd)

    def scan(self) -> tuple[list[VmRecord], list[CorruptRecordError]]:
        """Every record, and every record that cannot be read (each names its file)."""
        dir_fd = open_state_dir(self.root, create=False)
        if dir_fd is None:
            return [], []
        records, corrupt = [], []
        try:
            for n in sorted(os.listdir(dir_fd)):
                if not (n.endswith(".json") and is_vmid(n[:-5])):
                    continue
                try:
                    rec = self._load_at(dir_fd, int(n[:-5]))
                except CorruptRecordError as e:
                    corrupt.append(e)
                    continue
                if rec:
                    records.append(rec)
        finally:
            os.close(dir_fd)
        return records, corrupt

    def all(self) -> list[VmRecord]:
        return self.scan()[0]


# -- the locks ----------------------------------------------------------------------------------

# How often a run waiting for a lock tries again (flock has no timeout; filelock polls the
# same way, every 50 ms).
LOCK_POLL_S = 0.02

# address -> descriptor of every device lock this process holds: a forked writer
# (rebind.py) closes all but its own device's (close_locks_except).
_held: dict[str, int] = {}


def lock_path(root: Root, address: str) -> Path:
    """The lock file of one device: what filelock users (import-raw) lock too."""
    return root.lock_dir / f"{address}.lock"


def _take(dir_fd: int, name: str, path: Path, deadline: float, busy: PvehookError) -> int:
    fd = _open_own_file(dir_fd, name, path, os.O_RDWR | os.O_CREAT)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise busy from None
                time.sleep(LOCK_POLL_S)
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def device_locks(root: Root, addresses: list[str], timeout: float) -> Iterator[None]:
    """Hold the lock of every device, taken in one global order (no deadlock).

    One file per device under /run/pvehook/locks, locked with flock(2) LOCK_EX as
    filelock's UnixFileLock locks it, so a tool holding a filelock.FileLock on the file
    excludes the hook and the other way round. Not filelock itself: importing filelock
    3.18 (it imports asyncio) takes ~56 ms, five bare interpreter starts.
    """
    deadline = time.monotonic() + timeout
    dir_fd = open_state_dir(root, root.lock_dir.name)
    try:
        with ExitStack() as stack:
            for addr in sorted(set(addresses)):
                if not _ADDRESS_RE.fullmatch(addr):
                    raise ValueError(f"not a PCI address: {addr!r}")
                path = lock_path(root, addr)
                busy = HeldByOtherVMError(
                    f"{addr} is locked by another pvehook run (a VM starting or stopping, or"
                    " `pvehook import-raw` copying its disk)",
                    hint=f"wait for it, then retry; lock file {path}")
                fd = _take(dir_fd, path.name, path, deadline, busy)
                _held[addr] = fd
                stack.callback(_release, addr, fd)  # closing the file releases the lock
            yield
    finally:
        os.close(dir_fd)


def _release(addr: str, fd: int) -> None:
    if _held.get(addr) == fd:
        del _held[addr]
    os.close(fd)


@contextmanager
def record_lock(root: Root, vmid: int, timeout: float = 60.0) -> Iterator[None]:
    """The lock of one VM's record, held only while it is read and rewritten (never
    while waiting for a device lock: no deadlock)."""
    dir_fd = open_state_dir(root, root.lock_dir.name)
    path = root.lock_dir / f"vm-{vmid}.lock"
    try:
        fd = _take(dir_fd, path.name, path, time.monotonic() + timeout, HeldByOtherVMError(
            f"the record of VM {vmid} is locked by another pvehook run",
            hint=f"wait for it, then retry; lock file {path}"))
    finally:
        os.close(dir_fd)
    try:
        yield
    finally:
        os.close(fd)


def close_locks_except(address: str) -> None:
    """In a forked child: let go of every inherited device lock but `address`'s.

    flock belongs to the open file, which the child shares: a child stuck in the kernel
    would otherwise keep every device of the run locked, not only the one it writes for.
    """
    for addr, fd in list(_held.items()):
        if addr != address:
            os.close(fd)
            del _held[addr]
