"""What one run of the hook or the CLI works against: roots, kernel, node, deadlines."""

from __future__ import annotations

import os
from collections import namedtuple

from .records import Records
from .kernel import Kernel
from .paths import Root


class Timeouts(namedtuple("Timeouts", "rebind vfio_release namespaces lock give_back",
                            defaults=(60.0, 60.0, 60.0, 120.0, None))):
    """Seconds. Proxmox gives the hook no timeout of its own, so every wait has one.

    rebind: one unbind/drivers_probe write (a real drive may take seconds);
    vfio_release: QEMU exiting and closing /dev/vfio/<group>; namespaces: namespaces
    back and processed by udev; lock: a start waiting for a stop of the same device;
    give_back: how long after pre-start, or after a post-stop that kept the devices for
    a reboot, they go back unless the VM runs (None: qemu-server's start timeout for the
    VM's config + 60 s, see restarts.py).
    """

    __slots__ = ()

    @classmethod
    def from_env(cls) -> "Timeouts":
        """PVEHOOK_TIMEOUT_<NAME>=seconds overrides one (for tests and slow hardware)."""
        env = {name: os.environ.get(f"PVEHOOK_TIMEOUT_{name.upper()}") for name in cls._fields}
        return cls(**{name: float(v) for name, v in env.items() if v})


def node_name() -> str:
    # Proxmox's node name is the short host name (PVE::INotify::nodename).
    return os.uname().nodename.split(".")[0]


class Context:
    """Each part defaults to the real one: / (or PVEHOOK_ROOT), this node, the env."""

    def __init__(self, root: Root | None = None, kernel: Kernel | None = None,
                 node: str | None = None, timeouts: Timeouts | None = None, later=None):
        self.root = root if root is not None else Root.from_env()
        self.kernel = kernel if kernel is not None else Kernel()
        self.node = node if node is not None else node_name()
        self.timeouts = timeouts if timeouts is not None else Timeouts.from_env()
        self._later = later

    @property
    def later(self):
        """What runs a deferred release (later.Later: a systemd timer or a process)."""
        if self._later is None:
            from .later import Later

            self._later = Later(self.root)
        return self._later

    @property
    def records(self) -> Records:
        return Records(self.root)
