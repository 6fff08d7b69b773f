"""Move PCI functions between drivers, by address, with deadlines, several at once.

Per address only (Documentation/ABI/testing/sysfs-bus-pci): set `driver_override`, write
the address to the current driver's `unbind`, then to `drivers_probe` (and, for a driver
that does not match the device by id, to the driver's `bind`). Unlike vfio-pci's
`new_id`, this never captures an identical twin.

A write to unbind/bind/drivers_probe can block for as long as the driver wants (a device
still open through VFIO, a controller draining its I/O), and Proxmox gives the hook no
timeout. So each such write runs in a forked child that we wait for on a pidfd, with a
deadline; a child stuck in the kernel is left behind (nothing can kill a task in D state)
with its stdio on /dev/null, so Proxmox is not kept waiting on our pipes. Of the device
locks it inherits it keeps only its own device's: until the kernel is done with that
device, no other hook run can act on it, while the other devices of the run are free as
soon as this run ends.

Each device goes through its own steps; all devices at the same time. N controllers
that each take seconds to shut down cost about one shutdown, not N, and a slow device
does not hold back the others.
"""

from __future__ import annotations

import os
import select
import time
from collections import namedtuple
from pathlib import Path

from .records import close_locks_except
from .kernel import Kernel
from .pci import PciDevice

DEFAULT_TIMEOUT_S = 60.0


class _Child(namedtuple("_Child", "pid pidfd failure deadline")):
    """One forked writer; `failure`: what it means when its write fails."""

    __slots__ = ()


def _start(kernel: Kernel, path: Path, value: str, failure: str, timeout: float) -> _Child:
    pid = os.fork()
    if pid == 0:  # child: one write; exit status = errno
        code = 255
        try:
            close_locks_except(value)  # the write's value is the device's address
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):  # Proxmox reads the task log until these close
                os.dup2(null, fd)
            kernel.write(path, value)
            code = 0
        except OSError as e:
            code = e.errno if e.errno and e.errno < 255 else 255
        except BaseException:
            pass
        os._exit(code)
    return _Child(pid, os.pidfd_open(pid), failure, time.monotonic() + timeout)


def _write_override(kernel: Kernel, dev: PciDevice, driver: str | None) -> None:
    # A lone newline clears driver_override (drivers/pci/pci-sysfs.c).
    kernel.write(dev.sys_path / "driver_override", (driver or "") + "\n")


class _Move:
    """One device's way to its target driver: unbind -> drivers_probe -> bind."""

    def __init__(self, kernel: Kernel, dev: PciDevice, target: str | None, timeout: float):
        self.kernel, self.dev, self.target, self.timeout = kernel, dev, target, timeout
        self.addr = str(dev.address)
        self.child: _Child | None = None
        self.error: str | None = None
        self.stuck = False  # a write of ours may still change this device, later
        self.step = "start"

    def advance(self) -> None:
        """Start the next write, or finish (child None) when there is none."""
        dev, target, addr = self.dev, self.target, self.addr
        self.child = None
        current = dev.driver
        if self.step == "start" and current is not None and current != target:
            self.step = "unbind"
            self._write(dev.root.sys("bus", "pci", "drivers", current, "unbind"),
                        f"driver {current} did not release {addr}")
        elif self.step in ("start", "unbind") and target is not None and current is None:
            self.step = "probe"
            self._write(dev.root.sys("bus", "pci", "drivers_probe"),
                        f"{target} did not take {addr}")
        elif self.step == "probe" and current is None and target is not None:
            # A driver that does not match the device by id (bound by hand before).
            drv = dev.root.sys("bus", "pci", "drivers", target)
            if drv.is_dir():
                self.step = "bind"
                self._write(drv / "bind", f"{target} did not take {addr}")

    def _write(self, path: Path, failure: str) -> None:
        self.child = _start(self.kernel, path, self.addr, failure, self.timeout)

    def reap(self) -> None:
        c = self.child
        _, status = os.waitpid(c.pid, 0)
        os.close(c.pidfd)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            reason = os.strerror(code) if 0 < code < 255 else f"exit status {code}"
            self.error, self.child = f"{c.failure}: {reason}", None
        else:
            self.advance()

    def abandon(self) -> None:
        c = self.child
        os.close(c.pidfd)  # the child stays, stuck in the kernel; we go on
        self.error = f"{c.failure}: no answer from the kernel within {self.timeout:g} s"
        self.stuck = True
        self.child = None


class Errors(dict):
    """address -> what went wrong; `stuck`: addresses with a write still in the kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.stuck: set[str] = set()


def move(kernel: Kernel, moves: list[tuple[PciDevice, str | None]],
         timeout: float = DEFAULT_TIMEOUT_S, keep_override: bool = True) -> Errors:
    """Move each device to its target driver (None: leave it unbound), concurrently.

    Returns address -> error for every device that did not end on its target; the others
    ended there, verified by reading sysfs again. With keep_override the target stays in
    driver_override (so nothing else grabs the device while a VM has it); otherwise it
    is cleared afterwards.
    """
    errors = Errors()
    running: list[_Move] = []
    for dev, target in moves:
        m = _Move(kernel, dev, target, timeout)
        try:
            _write_override(kernel, dev, target)
        except OSError as e:
            errors[m.addr] = f"cannot set driver_override of {m.addr}: {e.strerror}"
            continue
        m.advance()
        running.append(m)

    while busy := [m for m in running if m.child is not None]:
        now = time.monotonic()
        for m in busy:
            if m.child.deadline <= now:
                m.abandon()
        busy = [m for m in busy if m.child is not None]
        if not busy:
            break
        wait = min(m.child.deadline for m in busy) - now
        ready = set(select.select([m.child.pidfd for m in busy], [], [], max(wait, 0))[0])
        for m in busy:
            if m.child.pidfd in ready:
                m.reap()

    for m in running:
        if m.error is None and m.dev.driver != m.target:
            now_on = m.dev.driver or "no driver"
            m.error = (f"{m.target} did not take {m.addr} (it is on {now_on})" if m.target
                       else f"{m.addr} is still on {now_on}")
        if m.error is None and not keep_override:
            try:
                _write_override(kernel, m.dev, None)
            except OSError as e:
                m.error = f"cannot clear driver_override of {m.addr}: {e.strerror}"
        if m.error is not None:
            errors[m.addr] = m.error
        if m.stuck:
            errors.stuck.add(m.addr)
    return errors
