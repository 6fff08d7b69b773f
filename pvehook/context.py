"""What one run of the hook or the CLI works against: roots, kernel, node, deadlines."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from .journal import Journal
from .kernel import Kernel
from .paths import Root


@dataclass(frozen=True)
class Timeouts:
    """Seconds. Proxmox gives the hook no timeout of its own, so every wait has one."""

    rebind: float = 60.0  # one unbind/drivers_probe write (a real drive may take seconds)
    vfio_release: float = 60.0  # QEMU exiting and closing /dev/vfio/<group>
    namespaces: float = 60.0  # namespaces back and processed by udev
    lock: float = 120.0  # a start waiting for a stop of the same device

    @classmethod
    def from_env(cls) -> "Timeouts":
        """PVEHOOK_TIMEOUT_<NAME>=seconds overrides one (for tests and slow hardware)."""
        env = {f.name: os.environ.get(f"PVEHOOK_TIMEOUT_{f.name.upper()}") for f in fields(cls)}
        return cls(**{name: float(v) for name, v in env.items() if v})


def node_name() -> str:
    # Proxmox's node name is the short host name (PVE::INotify::nodename).
    return os.uname().nodename.split(".")[0]


@dataclass
class Context:
    root: Root = field(default_factory=Root.from_env)
    kernel: Kernel = field(default_factory=Kernel)
    node: str = field(default_factory=node_name)
    timeouts: Timeouts = field(default_factory=Timeouts.from_env)

    @property
    def journal(self) -> Journal:
        return Journal(self.root)
