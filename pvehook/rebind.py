"""Move PCI functions between drivers, by address, with deadlines, several at once.

Per address only (Documentation/ABI/testing/sysfs-bus-pci): set `driver_override`, write
the address to the current driver's `unbind`, then to `drivers_probe`. Unlike vfio-pci's
`new_id`, this never captures an identical twin.

A write to unbind/bind/drivers_probe can block for as long as the driver wants (a device
still open through VFIO, a slow controller shutdown), and Proxmox gives the hook no
timeout. So each such write runs in a forked child that we wait for on a pidfd with a
deadline; a child stuck in the kernel is left behind (nothing can kill a task in D state)
with its stdio closed, so Proxmox is not kept waiting on our pipes. Children for
different devices run at the same time: N controllers that each take seconds to shut
down cost about one shutdown, not N.
"""

from __future__ import annotations

import os
import select
import time
from dataclasses import dataclass
from pathlib import Path

from .kernel import Kernel
from .pci import PciDevice

DEFAULT_TIMEOUT_S = 60.0


class Failed(Exception):
    """One device could not be moved; the message says which driver did what."""


@dataclass
class _Child:
    pid: int
    pidfd: int
    what: str


def _start(kernel: Kernel, path: Path, value: str, what: str) -> _Child:
    pid = os.fork()
    if pid == 0:  # child: one write, exit status = errno
        code = 255
        try:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, 65536)  # locks and pipes must not outlive us in a stuck child
            kernel.write(path, value)
            code = 0
        except OSError as e:
            code = e.errno if e.errno and e.errno < 255 else 255
        except BaseException:
            pass
        os._exit(code)
    return _Child(pid, os.pidfd_open(pid), what)


def _wait(children: dict[str, _Child], timeout: float) -> dict[str, str]:
    """Wait for every child until the deadline; returns key -> error for the failed."""
    errors: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    pending = dict(children)
    while pending:
        left = deadline - time.monotonic()
        fds = [c.pidfd for c in pending.values()]
        ready = select.select(fds, [], [], left)[0] if left > 0 else []
        if not ready:
            for key, c in pending.items():
                errors[key] = f"{c.what}: no answer from the kernel within {timeout:.0f} s"
                os.close(c.pidfd)  # the child stays, stuck in the kernel; we go on
            break
        for key, c in list(pending.items()):
            if c.pidfd in ready:
                _, status = os.waitpid(c.pid, 0)
                os.close(c.pidfd)
                del pending[key]
                code = os.waitstatus_to_exitcode(status)
                if code != 0:
                    reason = os.strerror(code) if 0 < code < 255 else f"exit status {code}"
                    errors[key] = f"{c.what}: {reason}"
    return errors


def _write_override(kernel: Kernel, dev: PciDevice, driver: str | None) -> None:
    # A lone newline clears driver_override (drivers/pci/pci-sysfs.c).
    kernel.write(dev.sys_path / "driver_override", (driver or "") + "\n")


def move(kernel: Kernel, moves: list[tuple[PciDevice, str | None]],
         timeout: float = DEFAULT_TIMEOUT_S, keep_override: bool = True) -> dict[str, str]:
    """Move each device to its target driver (None: leave it unbound), concurrently.

    Returns address -> error for every device that did not end on its target; the others
    ended there, verified by reading sysfs again. With keep_override the target stays in
    driver_override (so nothing else grabs the device while a VM has it); otherwise it
    is cleared afterwards.
    """
    errors: dict[str, str] = {}
    todo: list[tuple[PciDevice, str | None]] = []
    for dev, target in moves:
        try:
            _write_override(kernel, dev, target)
        except OSError as e:
            errors[str(dev.address)] = f"cannot set driver_override of {dev.address}: {e.strerror}"
            continue
        todo.append((dev, target))

    unbind: dict[str, _Child] = {}
    for dev, target in todo:
        current = dev.driver
        if current is not None and current != target:
            unbind[str(dev.address)] = _start(
                kernel, dev.root.sys("bus", "pci", "drivers", current, "unbind"), str(dev.address),
                f"driver {current} did not release {dev.address}")
    errors.update(_wait(unbind, timeout))

    probe: dict[str, _Child] = {}
    for dev, target in todo:
        addr = str(dev.address)
        if addr in errors or target is None or dev.driver == target:
            continue
        probe[addr] = _start(kernel, dev.root.sys("bus", "pci", "drivers_probe"), addr,
                             f"{target} did not take {addr}")
    errors.update(_wait(probe, timeout))

    # A driver that does not match by id (bound by hand before) needs an explicit bind.
    bind: dict[str, _Child] = {}
    for dev, target in todo:
        addr = str(dev.address)
        if addr in errors or target is None or dev.driver is not None:
            continue
        drv = dev.root.sys("bus", "pci", "drivers", target)
        if drv.is_dir():
            bind[addr] = _start(kernel, drv / "bind", addr, f"{target} did not take {addr}")
    errors.update(_wait(bind, timeout))

    for dev, target in todo:
        addr = str(dev.address)
        if addr not in errors and dev.driver != target:
            now = dev.driver or "no driver"
            errors[addr] = (f"{target} did not take {addr} (it is on {now})" if target
                            else f"{addr} is still on {now}")
        if not keep_override and addr not in errors:
            try:
                _write_override(kernel, dev, None)
            except OSError as e:
                errors[addr] = f"cannot clear driver_override of {addr}: {e.strerror}"
    return errors
