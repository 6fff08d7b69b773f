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

    def ipv4_addresses(self) -> dict[str, list[str]]:
        """Interface name -> its IPv4 addresses, from one SIOCGIFCONF ioctl.

        IPv4 addresses have no file in /proc or /sys (IPv6 has /proc/net/if_inet6); this
        asks the kernel without netlink and without running `ip`. An alias label
        (eth0:1) counts for its interface (eth0).
        """
        import array
        import fcntl
        import socket
        import struct

        siocgifconf, ifreq = 0x8912, 40  # sizeof(struct ifreq) on 64-bit Linux
        count = 64
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            while True:
                buf = array.array("B", bytes(count * ifreq))
                req = struct.pack("iL", len(buf), buf.buffer_info()[0])
                used = struct.unpack("iL", fcntl.ioctl(s.fileno(), siocgifconf, req))[0]
                if used < len(buf):  # not truncated
                    break
                count *= 4
        data = buf.tobytes()[:used]
        out: dict[str, list[str]] = {}
        for i in range(0, used, ifreq):
            name = data[i:i + 16].split(b"\0", 1)[0].decode(errors="replace")
            out.setdefault(name.split(":")[0], []).append(socket.inet_ntoa(data[i + 20:i + 24]))
        return out
