"""The undo record of one VM, and the per-device locks.

/run/pvehook/<vmid>.json says, per device the hook moved for that VM, which driver it came
from. It is written atomically *before* each change, so a hook killed halfway leaves a
record post-stop can act on. /run is a tmpfs: a reboot clears it, as it should.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from .errors import HeldByOtherVMError
from .paths import Root


class DeviceRecord:
    def __init__(self, address: str, original_driver: str | None, namespaces: int = 0):
        self.address = address
        self.original_driver = original_driver  # None: it had no driver
        self.namespaces = namespaces  # how many namespaces to wait for when it comes back

    def to_json(self) -> dict:
        return {"address": self.address, "original_driver": self.original_driver,
                "namespaces": self.namespaces}


class VmRecord:
    def __init__(self, vmid: int, devices: list[DeviceRecord] | None = None,
                 written: float = 0.0, generation: str | None = None,
                 kept_for_reboot: float | None = None):
        self.vmid = vmid
        self.devices = devices if devices is not None else []
        self.written = written
        # Which pre-start wrote it (restarts.new_generation): a deferred give-back acts
        # only on the record of the start that scheduled it.
        self.generation = generation
        # When post-stop kept the devices on vfio-pci for a reboot (epoch seconds).
        self.kept_for_reboot = kept_for_reboot

    def to_json(self) -> dict:
        out = {"vmid": self.vmid, "devices": [d.to_json() for d in self.devices],
               "written": self.written}
        if self.generation is not None:
            out["generation"] = self.generation
        if self.kept_for_reboot is not None:
            out["kept_for_reboot"] = self.kept_for_reboot
        return out

    def find(self, address: str) -> DeviceRecord | None:
        return next((d for d in self.devices if d.address == address), None)


class Journal:
    def __init__(self, root: Root):
        self.root = root
        self.dir = root.state_dir

    def _path(self, vmid: int):
        return self.dir / f"{vmid}.json"

    def load(self, vmid: int) -> VmRecord | None:
        try:
            data = json.loads(self._path(vmid).read_text())
        except FileNotFoundError:
            return None
        return VmRecord(data["vmid"], [DeviceRecord(**d) for d in data["devices"]],
                        data.get("written", 0.0), data.get("generation"),
                        data.get("kept_for_reboot"))

    def save(self, record: VmRecord) -> None:
        if not record.devices:
            self._path(record.vmid).unlink(missing_ok=True)
            return
        record.written = time.time()
        self.dir.mkdir(parents=True, exist_ok=True)
        # Our own temporary name (tempfile costs more to import than the whole write);
        # the pid in it keeps two hook runs from sharing one.
        tmp = self.dir / f".{record.vmid}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path(record.vmid))

    def all(self) -> list[VmRecord]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        out = []
        for n in sorted(names):
            if n.endswith(".json") and n[:-5].isdigit():
                rec = self.load(int(n[:-5]))
                if rec:
                    out.append(rec)
        return out


# How often a run waiting for a device's lock tries again (flock has no timeout;
# filelock polls the same way, every 50 ms).
LOCK_POLL_S = 0.02


@contextmanager
def device_locks(root: Root, addresses: list[str], timeout: float) -> Iterator[None]:
    """Hold the lock of every device, taken in one global order (no deadlock).

    One file per device under /run/lock/pvehook, locked with flock(2) LOCK_EX as
    filelock's UnixFileLock locks it, so a tool holding a filelock.FileLock on the file
    excludes the hook and the other way round. Not filelock itself: importing filelock
    3.18 (it imports asyncio) takes ~56 ms, five bare interpreter starts.
    """
    root.lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with ExitStack() as stack:
        for addr in sorted(set(addresses)):
            path = root.lock_dir / f"{addr}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            stack.callback(os.close, fd)  # closing the file releases the lock
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise HeldByOtherVMError(
                            f"{addr} is locked by another pvehook run (a VM starting or"
                            " stopping)", hint=f"wait for it, then retry; lock file {path}",
                        ) from None
                    time.sleep(LOCK_POLL_S)
        yield
