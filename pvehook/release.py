"""Give the devices of a stopped VM back to the host: `pvehook release <vmid>`, and the
deferred release that pre-start and a reboot's post-stop schedule (restarts.py).

Both hold qemu-server's own lock of the VM (PVE::QemuConfig lock_config: flock on
/var/lock/qemu-server/lock-<vmid>.conf, /var/lock being /run/lock), which qemu-server
holds through a whole start (pre-start, QEMU starting) and through `qm cleanup`
(post-stop, then the reboot's start is requested): so a release never runs between a
pre-start and the QEMU it prepared, and "not running" under that lock means stopped.
Then the device locks, as the hook takes them.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .context import Context
from .errors import GiveBackError, StateDirError, VmBusyError
from .holds import vm_running
from .paths import Root
from .tasklog import log

# As long as qemu-server's own default for lock_config: a CLI user is not kept waiting
# on a start in progress.
CLI_LOCK_TIMEOUT_S = 10.0


class VmLockedError(VmBusyError):
    """A Proxmox task holds the VM's lock (exit code 16, as a running VM)."""


@contextmanager
def qemu_server_lock(root: Root, vmid: int, timeout: float) -> Iterator[None]:
    """qemu-server's config lock of the VM (flock LOCK_EX, as PVE::Tools lock_file)."""
    path = root.run("lock", "qemu-server", f"lock-{vmid}.conf")
    path.parent.mkdir(mode=0o755, exist_ok=True)  # as qemu-server does
    # /run/lock is world-writable: a directory or lock file a local user planted there
    # is neither followed nor used (the same rule as pvehook's own state, records.py).
    st = os.lstat(path.parent)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        raise StateDirError(f"{path.parent} is not a directory of root's (uid {st.st_uid})",
                            hint="find out who created it, then remove it; qemu-server"
                                 " creates it again")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                     | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise StateDirError(f"cannot open {path}: {e.strerror} (a link?)",
                            hint="remove it; qemu-server creates it again") from None
    if os.fstat(fd).st_uid != 0:
        os.close(fd)
        raise StateDirError(f"{path} is not root's", hint="remove it; qemu-server creates it again")
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise VmLockedError(
                        f"VM {vmid} is locked by a Proxmox task (a start, stop or cleanup)"
                        f" for more than {timeout:g} s",
                        hint=f"wait for the task to end, then retry; lock file {path}"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def release(ctx: Context, vmid: int, generation: str | None = None,
            lock_timeout: float = CLI_LOCK_TIMEOUT_S) -> None:
    """Give back every device pvehook recorded for the VM.

    generation None (the CLI): refused while the VM runs. Otherwise (the deferred
    job): nothing happens when the VM runs or a newer start owns the record.
    """
    from .assign import give_back
    from .records import device_locks

    def running() -> bool:
        if not vm_running(ctx.root, vmid):
            return False
        if generation is None:
            raise VmBusyError(f"VM {vmid} is running: its devices are in use",
                              hint=f"stop it first (qm shutdown {vmid}); its post-stop gives"
                                   " them back")
        log.info("VM %d is running: its devices stay with it", vmid)
        return True

    if running():
        return
    if ctx.records.load(vmid) is None:  # read again under the locks below
        log.info("nothing recorded for VM %d: nothing to give back", vmid)
        return
    with qemu_server_lock(ctx.root, vmid, lock_timeout):
        if running():  # started while we waited for the lock
            return
        record = ctx.records.load(vmid)
        if record is None:
            log.info("nothing recorded for VM %d: nothing to give back", vmid)
            return
        with device_locks(ctx.root, [d.address for d in record.devices], ctx.timeouts.lock):
            record = ctx.records.load(vmid)  # again, under the locks
            if record is None:
                log.info("nothing recorded for VM %d: nothing to give back", vmid)
                return
            if generation is not None and record.generation != generation:
                log.info("VM %d was started again since: its devices stay with that start",
                         vmid)
                return
            if generation is not None:
                why = ("its reboot's start did not follow" if record.kept_for_reboot
                       else "its start failed after pre-start")
                log.info("VM %d is not running (%s): giving its devices back", vmid, why)
            errors = give_back(ctx, record, list(record.devices))
    if errors:
        raise GiveBackError("; ".join(errors))


def deferred_release(ctx: Context, vmid: int, generation: str) -> None:
    """The scheduled job. A VM locked past the lock timeout (a start still going on):
    try again after another bound rather than give up on the devices."""
    from .restarts import schedule_release

    try:
        release(ctx, vmid, generation, lock_timeout=ctx.timeouts.lock)
    except VmLockedError as e:
        log.warning("%s", e)
        if not schedule_release(ctx, vmid, generation, "tried again: the VM was locked"):
            raise
