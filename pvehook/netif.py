"""Network interfaces on a PCI function, and whether the host uses them.

The host uses an interface it configured: an IPv4 address, an IPv6 address other than the
link-local one the kernel adds by itself, a master (bridge, bond, team, Open vSwitch: the
node's `vmbr0` is a bridge over its uplink) or an upper device (VLAN, macvlan). An
interface that is only up, with none of these, carries nothing the host relies on.

Read without netlink and without running `ip`: /sys/class/net for the links and flags,
/proc/net/if_inet6 for IPv6, and one SIOCGIFCONF ioctl (`Kernel.ipv4_addresses`) for IPv4,
which has no file of its own.
"""

from __future__ import annotations

import os
from collections import namedtuple
from pathlib import Path

from .kernel import Kernel
from .paths import Root
from .pci import class_devices_under

IFF_UP = 0x1
_SCOPE_LINK = 0x20  # /proc/net/if_inet6 scope of fe80::/10 (IPV6_ADDR_LINKLOCAL)


class NetIf(namedtuple("NetIf", "name sys_path")):
    __slots__ = ()

    def _read(self, name: str) -> str | None:
        try:
            return (self.sys_path / name).read_text().strip()
        except OSError:
            return None

    @property
    def up(self) -> bool:
        flags = self._read("flags")
        return bool(flags and int(flags, 16) & IFF_UP)

    @property
    def master(self) -> str | None:
        try:
            return os.path.basename(os.readlink(self.sys_path / "master"))
        except OSError:
            return None

    @property
    def uppers(self) -> list[str]:
        try:
            return sorted(n[len("upper_"):] for n in os.listdir(self.sys_path)
                          if n.startswith("upper_"))
        except OSError:
            return []


def interfaces_under(root: Root, sys_dir: Path) -> list[NetIf]:
    """Every interface whose device sits under `sys_dir` (<pci>/net/eth0, or deeper as
    virtio-net's <pci>/virtio0/net/eth0)."""
    return [NetIf(name, path) for name, path in class_devices_under(root, "net", sys_dir)]


def ipv6_addresses(root: Root) -> dict[str, list[str]]:
    """Interface -> its IPv6 addresses that are not link-local (/proc/net/if_inet6)."""
    out: dict[str, list[str]] = {}
    try:
        text = root.proc("net", "if_inet6").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 6 or int(fields[3], 16) & 0xF0 == _SCOPE_LINK:
            continue
        hexaddr = fields[0]
        addr = ":".join(hexaddr[i:i + 4].lstrip("0") or "0" for i in range(0, 32, 4))
        out.setdefault(fields[5], []).append(f"{addr}/{int(fields[2], 16)}")
    return out


class NetUse:
    def __init__(self) -> None:
        self.reasons: list[str] = []  # the host uses it: refuse
        self.notes: list[str] = []  # there, harmless


def host_use(root: Root, kernel: Kernel, netifs: list[NetIf]) -> NetUse:
    use = NetUse()
    if not netifs:
        return use
    ipv4 = kernel.ipv4_addresses()
    ipv6 = ipv6_addresses(root)
    for nif in netifs:
        why = []
        addrs = ipv4.get(nif.name, []) + ipv6.get(nif.name, [])
        if addrs:
            why.append("has the address " + ", ".join(addrs))
        if nif.master:
            why.append(f"is a port of {nif.master}")
        if nif.uppers:
            why.append("carries " + ", ".join(nif.uppers))
        state = "up" if nif.up else "down"
        if why:
            use.reasons.append(f"network interface {nif.name} ({state}) " + " and ".join(why))
        else:
            use.notes.append(f"network interface {nif.name} ({state}, no address, no bridge"
                             " or bond)")
    return use
