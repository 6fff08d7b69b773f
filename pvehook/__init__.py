"""pvehook: safe NVMe passthrough for Proxmox VE."""

__version__ = "0.1.0"
