"""Waits that end on the event they wait for, with a deadline.

- a process that still has the device's /dev/vfio node open (QEMU still exiting): wait for
  that process to exit, on a pidfd;
- namespaces coming back after nvme takes the controller again: wait for udev's events
  (netlink, through pyudev) until every namespace and partition has been processed.
"""

from __future__ import annotations

import os
import select
import time

from .block import BlockDevice, namespaces
from .paths import Root
from .pci import PciDevice


def vfio_nodes(dev: PciDevice) -> set[str]:
    """The /dev paths through which a process can hold this device open (under the
    root: what /proc/<pid>/fd links to, also for a test tree's real openers)."""
    nodes = set()
    if dev.iommu_group is not None:
        nodes.add(str(dev.root.dev("vfio", str(dev.iommu_group))))
    try:  # the per-device cdev (iommufd) of newer kernels
        for name in os.listdir(dev.sys_path / "vfio-dev"):
            nodes.add(str(dev.root.dev("vfio", "devices", name)))
    except FileNotFoundError:
        pass
    return nodes


def processes_holding(root: Root, nodes: set[str]) -> list[int]:
    pids = []
    try:
        entries = os.listdir(root.proc())
    except FileNotFoundError:
        return pids
    for entry in entries:
        if not entry.isdigit():
            continue
        fd_dir = root.proc(entry, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(fd_dir / fd) in nodes:
                    pids.append(int(entry))
                    break
            except OSError:
                continue
    return pids


def wait_exit(pids: list[int], timeout: float) -> list[int]:
    """Wait until these processes exit; return those still alive at the deadline."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout
    try:
        while fds:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd in select.select(list(fds), [], [], left)[0]:
                os.close(fd)
                del fds[fd]
        return sorted(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


def _processed(dev: PciDevice, expected: int) -> list[BlockDevice] | None:
    """The namespaces, once `expected` of them and all their partitions have a udev
    database entry (udev has run its rules on them)."""
    disks = namespaces(dev)
    if len(disks) < expected:
        return None
    for disk in disks:
        for b in (disk, *disk.partitions()):
            if b.udev() is None:
                return None
    return disks


def wait_namespaces(dev: PciDevice, expected: int, timeout: float,
                    monitor=None) -> list[BlockDevice]:
    """Block until the controller's namespaces are back and udev has processed them.

    `monitor` is a started pyudev Monitor; None makes one here when the first look
    finds them not yet back. Events only wake us: the verdict comes from sysfs and
    udev's database, so an event that came before the monitor is not missed.
    """
    found = _processed(dev, expected)
    if found is not None:
        return found
    if monitor is None:
        monitor = udev_monitor()
    deadline = time.monotonic() + timeout
    # Look again after every event, and once right after the monitor started.
    while (found := _processed(dev, expected)) is None:
        left = deadline - time.monotonic()
        if left <= 0:
            have = ", ".join(b.name for b in namespaces(dev)) or "none"
            raise TimeoutError(
                f"{dev.address}: {expected} namespace(s) expected back within {timeout:.0f} s,"
                f" udev has processed: {have}")
        monitor.poll(timeout=left)
    return found


def udev_monitor():
    import pyudev  # lazy: only post-stop needs udev's events

    monitor = pyudev.Monitor.from_netlink(pyudev.Context())
    monitor.filter_by("block")
    monitor.start()
    return monitor
