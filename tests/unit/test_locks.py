"""The per-device locks: flock(2) on /run/pvehook/locks/<address>.lock, the protocol of
filelock's UnixFileLock, so the hook and any filelock user of the same file exclude each
other. The other side always runs in its own process, as it would on a node."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pvehook.errors import HeldByOtherVMError
from pvehook.records import device_locks
from pvehook.paths import Root

A = "0000:01:00.0"
B = "0000:02:00.0"

filelock = pytest.importorskip("filelock")


# The other process imports what this one does (the work tree, or the installed package).
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def holder(code: str, *args: str) -> subprocess.Popen:
    """Another process that takes a lock, prints "held", and keeps it until stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().split()[0] == "held"
    return proc


FILELOCK_HOLDER = """
import sys, filelock
with filelock.FileLock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""

HOOK_HOLDER = """
import sys, time
from pvehook.records import device_locks
from pvehook.paths import Root
with device_locks(Root(sys.argv[1]), sys.argv[2:], timeout=10):
    print("held", time.monotonic(), flush=True)
    sys.stdin.read()
"""


def release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(10) == 0


def test_a_filelock_holder_keeps_the_hook_out_until_it_lets_go(tmp_path):
    root = Root(tmp_path)
    root.lock_dir.mkdir(parents=True)
    other = holder(FILELOCK_HOLDER, str(root.lock_dir / f"{B}.lock"))
    try:
        t0 = time.monotonic()
        with pytest.raises(HeldByOtherVMError, match=f"{B} is locked by another pvehook run"):
            with device_locks(root, [A, B], timeout=0.3):
                pass
        assert time.monotonic() - t0 >= 0.3
    finally:
        release(other)
    # A was taken first and given up with the failure: both are free again.
    with device_locks(root, [A, B], timeout=0.3):
        pass


def test_the_hook_lock_keeps_filelock_out(tmp_path):
    root = Root(tmp_path)
    with device_locks(root, [A], timeout=1):
        lock = filelock.FileLock(str(root.lock_dir / f"{A}.lock"))
        with pytest.raises(filelock.Timeout):
            lock.acquire(timeout=0.2)
    lock.acquire(timeout=0.2)  # released with the with block
    lock.release()


def test_a_waiting_run_gets_the_lock_when_the_other_lets_go(tmp_path):
    other = holder(HOOK_HOLDER, str(tmp_path), A, B)
    try:
        # The same holder, with nothing on stdin: it lets go as soon as it has the lock.
        waiter = subprocess.Popen([sys.executable, "-c", HOOK_HOLDER, str(tmp_path), B],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                                  env=ENV)
        time.sleep(0.3)
        assert waiter.poll() is None  # still waiting
        released = time.monotonic()
    finally:
        release(other)
    said, got = waiter.communicate(timeout=10)[0].split()
    assert said == "held"
    got = float(got)
    assert waiter.returncode == 0
    assert released <= got < released + 5  # woke up on the release, long before its 10 s


def test_the_lock_directory_is_created(tmp_path):
    root = Root(tmp_path / "fresh")
    with device_locks(root, [A], timeout=1):
        assert (root.lock_dir / f"{A}.lock").exists()


def test_the_lock_directory_is_root_only_and_filelock_shares_it(tmp_path):
    """The directory the hook makes is 0700; import-raw's filelock then locks the file
    the hook locks (records.lock_path), and each keeps the other out."""
    from pvehook.records import lock_path

    root = Root(tmp_path)
    with device_locks(root, [A], timeout=1):
        pass
    for d in (root.state_dir, root.lock_dir):
        assert oct(d.stat().st_mode & 0o777) == "0o700"
    other = holder(FILELOCK_HOLDER, str(lock_path(root, A)))
    try:
        with pytest.raises(HeldByOtherVMError):
            with device_locks(root, [A], timeout=0.1):
                pass
    finally:
        release(other)
    with device_locks(root, [A], timeout=1):
        lock = filelock.FileLock(str(lock_path(root, A)))
        with pytest.raises(filelock.Timeout):
            lock.acquire(timeout=0.1)
