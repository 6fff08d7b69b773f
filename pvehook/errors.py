"""One error base; each refusal kind carries its exit code.

Only the hook entry and the CLI turn these into exit codes and messages.
"""

from __future__ import annotations

from . import exitcodes as codes


class PvehookError(Exception):
    """Base of every error pvehook raises on purpose."""

    exit_code = codes.ERROR

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg}; {self.hint}" if self.hint else msg


class UsageError(PvehookError, ValueError):
    exit_code = codes.USAGE


class ConfigError(PvehookError, ValueError):
    """A Proxmox file is missing, unreadable or malformed."""

    exit_code = codes.ERROR


class StateDirError(PvehookError):
    """/run/pvehook (records, locks) or a file in it is not pvehook's alone."""

    exit_code = codes.ERROR


class DeviceNotFoundError(PvehookError, LookupError):
    """A hostpci id or mapping names nothing on this node."""

    exit_code = codes.NO_DEVICE


class IommuError(PvehookError):
    """No IOMMU, no group, or the group is not isolated."""

    exit_code = codes.IOMMU


class InUseError(PvehookError):
    """The host uses the disk (mounted, swap, held, opened exclusively)."""

    exit_code = codes.IN_USE


class HeldByOtherVMError(PvehookError):
    """Another running VM holds the device."""

    exit_code = codes.HELD


class BindError(PvehookError, OSError):
    """A driver did not release or take a device, or did not in time."""

    exit_code = codes.BIND


class GiveBackError(PvehookError):
    """post-stop could not give every device back."""

    exit_code = codes.GIVE_BACK


class VolumeError(PvehookError):
    """An LVM volume of the VM cannot be confirmed as a RAW volume."""

    exit_code = codes.VOLUME


# -- the CLI's own (the hook never raises these) -----------------------------------------

class NotRootError(PvehookError, PermissionError):
    exit_code = codes.NOT_ROOT


class NotProxmoxError(PvehookError):
    """No pvesh/pvesm, or a proxmoxer without the local backend."""

    exit_code = codes.NOT_PROXMOX


class VmNotFoundError(PvehookError, LookupError):
    exit_code = codes.NO_VM


class StorageError(PvehookError):
    """No usable storage: missing, not of the needed type, without the needed content."""

    exit_code = codes.STORAGE


class HookscriptConflictError(PvehookError):
    """The VM already has another hookscript."""

    exit_code = codes.HOOKSCRIPT_CONFLICT


class NodeNotReadyError(PvehookError):
    """doctor found at least one problem."""

    exit_code = codes.NOT_READY


class ApiError(PvehookError):
    """Proxmox refused a request, or pvesh failed."""

    exit_code = codes.ERROR

    def __init__(self, message: str, hint: str | None = None, status: int | None = None):
        super().__init__(message, hint)
        self.status = status


class TaskError(ApiError):
    """The Proxmox task ended with an error."""


class VmBusyError(PvehookError):
    """The VM cannot take the change now: running, locked, or on another node."""

    exit_code = codes.VM_BUSY


class ImageHeaderError(PvehookError):
    """The source starts with a header qemu-img would probe instead of reading raw."""

    exit_code = codes.IMAGE_HEADER


class Refusals(PvehookError):
    """Several refusals at once; the exit code is that of the first."""

    def __init__(self, errors: list[PvehookError]):
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors
        self.exit_code = errors[0].exit_code


class DriveMismatchError(PvehookError):
    """The drive at a VM's address is not the one pinned for it, or cannot be shown to be."""

    exit_code = codes.NOT_PINNED
