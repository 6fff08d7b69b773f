"""The `pvehook` command (click), a house of its own: the hook never imports this package.

entry: the group, shared options, errors -> exit codes; configs: the cluster's VM configs
and this node; api: Proxmox through pvesh (proxmoxer); register, status, doctor,
importraw, pin, release, reserve: the commands.
"""

from .entry import cli, main  # noqa: F401
from . import doctor, importraw, pin, register, release, reserve, status  # noqa: F401,E402 (each adds its commands to cli)
