"""What the CLI reads of the cluster without the API: the VM configs of every node under
/etc/pve, which of them use pvehook's hookscript, and this node's name.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..context import Context, node_name
from ..errors import ConfigError
from ..hook import is_vmid
from ..paths import HOOK_PATH, Root
from ..vmconfig import VmConfig

SNIPPET_NAME = "pvehook-hook"
SNIPPET_VOLNAME = f"snippets/{SNIPPET_NAME}"
SNIPPET_BODY = f'#!/bin/sh\nexec {HOOK_PATH} "$@"\n'


def is_ours(hookscript: str | None) -> bool:
    """A hookscript volume `<storage>:snippets/pvehook-hook` (on any storage)."""
    return bool(hookscript) and hookscript.partition(":")[2] == SNIPPET_VOLNAME


def snippet_volid(storage: str) -> str:
    return f"{storage}:{SNIPPET_VOLNAME}"


def local_node(root: Root) -> str:
    """This node's name: /etc/pve/local links to nodes/<name> on a Proxmox node."""
    try:
        return os.path.basename(os.readlink(root.pve("local")).rstrip("/"))
    except OSError:
        return node_name()


def context() -> Context:
    root = Root.from_env()
    return Context(root=root, node=local_node(root))


def vm_configs(root: Root, node: str | None = None) -> list[tuple[str, int, VmConfig | ConfigError]]:
    """(node, vmid, config or its parse error) of every VM in the cluster (or one node)."""
    out = []
    try:
        dirs = [(n, root.pve("nodes", n, "qemu-server")) for n in sorted(os.listdir(root.pve("nodes")))]
    except FileNotFoundError:
        dirs = []
    own = root.pve("qemu-server")
    if own.is_dir() and not own.is_symlink() and not dirs:
        dirs = [(local_node(root), own)]  # a lone node's tree without nodes/ (tests, guests)
    for n, d in dirs:
        if node is not None and n != node:
            continue
        try:
            names = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            if not (name.endswith(".conf") and is_vmid(name[:-5])):  # not "².conf"
                continue
            vmid = int(name[:-5])
            path = d / name
            try:
                conf = VmConfig.from_text(vmid, path.read_bytes().decode("utf-8", "replace"), str(path))
            except ConfigError as e:
                conf = e
            except PermissionError:
                raise
            except OSError as e:
                conf = ConfigError(f"cannot read {path}: {e.strerror or e}")
            out.append((n, vmid, conf))
    out.sort(key=lambda t: t[1])
    return out


def registered_vms(root: Root) -> list[tuple[int, str, str]]:
    """(vmid, node, hookscript volume) of every VM whose hookscript is pvehook's."""
    return [(vmid, n, conf.hookscript) for n, vmid, conf in vm_configs(root)
            if isinstance(conf, VmConfig) and is_ours(conf.hookscript)]


def read_or_none(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
