"""The one seam under every kernel and Proxmox path.

Everything that reads or writes /sys, /proc, /dev, /etc/pve or /run goes through a
`Root`. Tests build one over a temporary tree; production uses `Root("/")`.
"""

from __future__ import annotations

import os
from pathlib import Path

# Where the Debian package installs the hook; registered snippets run this path.
HOOK_PATH = "/usr/share/pvehook/pvehook-hook"


class Root:
    def __init__(self, path: Path | str = "/"):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Root({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Root) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    @classmethod
    def from_env(cls) -> "Root":
        # PVEHOOK_ROOT only exists for tests and benchmarks on a fake tree.
        return cls(Path(os.environ.get("PVEHOOK_ROOT", "/")))

    def _join(self, absolute: str) -> Path:
        return self.path / absolute.lstrip("/")

    def sys(self, *parts: str) -> Path:
        return self._join("/sys").joinpath(*parts)

    def proc(self, *parts: str) -> Path:
        return self._join("/proc").joinpath(*parts)

    def dev(self, *parts: str) -> Path:
        return self._join("/dev").joinpath(*parts)

    def pve(self, *parts: str) -> Path:
        return self._join("/etc/pve").joinpath(*parts)

    def run(self, *parts: str) -> Path:
        return self._join("/run").joinpath(*parts)

    def etc(self, *parts: str) -> Path:
        return self._join("/etc").joinpath(*parts)

    def var_lib(self, *parts: str) -> Path:
        return self._join("/var/lib").joinpath(*parts)

    # Places the hook owns.
    @property
    def state_dir(self) -> Path:
        return self.run("pvehook")

    @property
    def lock_dir(self) -> Path:
        # Under state_dir, not /run/lock (world-writable: see records.py).
        return self.state_dir / "locks"

    @property
    def lib_dir(self) -> Path:
        """Node-local state that survives reboots (reservations, drive pins)."""
        return self.var_lib("pvehook")
