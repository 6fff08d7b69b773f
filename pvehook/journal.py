"""The undo record of one VM, and the per-device locks.

/run/pvehook/<vmid>.json says, per device the hook moved for that VM, which driver it came
from. It is written atomically *before* each change, so a hook killed halfway leaves a
record post-stop can act on. /run is a tmpfs: a reboot clears it, as it should.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator

from .errors import HeldByOtherVMError
from .paths import Root


@dataclass
class DeviceRecord:
    address: str
    original_driver: str | None  # None: it had no driver
    namespaces: int = 0  # how many namespaces to wait for when it comes back


@dataclass
class VmRecord:
    vmid: int
    devices: list[DeviceRecord] = field(default_factory=list)
    written: float = 0.0

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
                        data.get("written", 0.0))

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
            json.dump(asdict(record), f, indent=1)
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


@contextmanager
def device_locks(root: Root, addresses: list[str], timeout: float) -> Iterator[None]:
    """Hold the lock of every device, taken in one global order (no deadlock)."""
    from filelock import FileLock, Timeout  # lazy: only phases that touch devices

    root.lock_dir.mkdir(parents=True, exist_ok=True)  # filelock 3.9 does not
    with ExitStack() as stack:
        for addr in sorted(set(addresses)):
            lock = FileLock(str(root.lock_dir / f"{addr}.lock"))
            try:
                stack.enter_context(lock.acquire(timeout=timeout))
            except Timeout:
                raise HeldByOtherVMError(
                    f"{addr} is locked by another pvehook run (a VM starting or stopping)",
                    hint=f"wait for it, then retry; lock file {root.lock_dir}/{addr}.lock",
                ) from None
        yield
