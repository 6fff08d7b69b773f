"""The one seam under every kernel and Proxmox path.

Everything that reads or writes /sys, /proc, /dev, /etc/pve or /run goes through a
`Root`. Tests build one over a temporary tree; production uses `Root("/")`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Where the Debian package installs the hook; registered snippets run this path.
HOOK_PATH = "/usr/share/pvehook/pvehook-hook"


@dataclass(frozen=True)
class Root:
    path: Path = Path("/")

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

    # Places the hook owns.
    @property
    def state_dir(self) -> Path:
        return self.run("pvehook")

    @property
    def lock_dir(self) -> Path:
        return self.run("lock", "pvehook")
