"""What pvehook asks of the kernel beyond reading files.

Reads of sysfs are plain file reads through `Root`. Writes that bind, unbind or probe a
driver, the exclusive-open probe and module loading go through a `Kernel`, so the fast
tests can put a small fake kernel in its place that does what the real one would.
"""

from __future__ import annotations

import os
from pathlib import Path


class Kernel:
    def write(self, path: Path, value: str) -> None:
        # One write() call: the kernel parses the buffer it is given, once.
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def open_exclusive(self, path: Path) -> None:
        """Raise OSError(EBUSY) when anyone holds the block device exclusively.

        On a block device O_EXCL without O_CREAT fails while it is mounted, active swap,
        or claimed by device-mapper, md or ZFS: one probe for every exclusive user.
        """
        os.close(os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))

    def load_module(self, name: str) -> None:
        """modprobe; an OSError (with modprobe's own message) when it fails."""
        import subprocess  # rarely needed: vfio-pci is usually loaded

        proc = subprocess.run(["modprobe", name], capture_output=True, text=True)
        if proc.returncode != 0:
            why = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
            raise OSError(f"modprobe {name}: {why}")
