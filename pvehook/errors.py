"""One error base; each refusal kind carries its exit code.

Only the hook entry and the CLI turn these into exit codes and messages.
"""

from __future__ import annotations


class PvehookError(Exception):
    """Base of every error pvehook raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg}; {self.hint}" if self.hint else msg


class UsageError(PvehookError, ValueError):
    exit_code = 2


class ConfigError(PvehookError, ValueError):
    """A Proxmox file is missing, unreadable or malformed."""

    exit_code = 1


class StateDirError(PvehookError):
    """/run/pvehook (records, locks) or a file in it is not pvehook's alone."""

    exit_code = 1


class DeviceNotFoundError(PvehookError, LookupError):
    """A hostpci id or mapping names nothing on this node."""

    exit_code = 3


class IommuError(PvehookError):
    """No IOMMU, no group, or the group is not isolated."""

    exit_code = 10


class InUseError(PvehookError):
    """The host uses the disk (mounted, swap, held, opened exclusively)."""

    exit_code = 11


class HeldByOtherVMError(PvehookError):
    """Another running VM holds the device."""

    exit_code = 12


class BindError(PvehookError, OSError):
    """A driver did not release or take a device, or did not in time."""

    exit_code = 13


class GiveBackError(PvehookError):
    """post-stop could not give every device back."""

    exit_code = 14


class VolumeError(PvehookError):
    """An LVM volume of the VM cannot be confirmed as a RAW volume."""

    exit_code = 15


class Refusals(PvehookError):
    """Several refusals at once; the exit code is that of the first."""

    def __init__(self, errors: list[PvehookError]):
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors
        self.exit_code = errors[0].exit_code
