"""Talking to Proxmox VE: registering the hookscript on VMs (CLI only).

Everything goes through `pvesh` (proxmoxer's `local` backend runs
`pvesh get|set|create|delete <path> -key value ... --output-format json`), because only
root@pam may set `hookscript` and no API token can. `pvesm path` resolves a volume to its
file. The hook never imports this module; proxmoxer is imported only when a command
needs the API.

Facts used (checked in Proxmox's sources):
- PUT /nodes/{node}/qemu/{vmid}/config checks the hookscript volume with
  PVE::GuestHelpers::check_hookscript (vtype snippets, a file, executable) and raises
  `400 Parameter verification failed.` with `hookscript: <why>` otherwise; it is proxied
  to the VM's node, so the script must exist on that node (qemu-server API2/Qemu.pm).
- A missing VM config is a plain die: "Configuration file 'nodes/<node>/qemu-server/
  <vmid>.conf' does not exist" (pve-guest-common AbstractConfig.pm load_config).
- pvesh prints uncaught errors on stderr and exits non-zero; PVE::Exception puts the HTTP
  code first (pve-common Exception.pm stringify). proxmoxer takes the first stderr line
  that starts with `NNN <letter>` as the status, else 500, and ignores the exit status
  (proxmoxer backends/command_base.py).
- `pvesm set <storage> --content` replaces the whole list (pve-storage Config.pm update).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PvehookError
from .paths import HOOK_PATH

SNIPPET_NAME = "pvehook-hook"
SNIPPET_VOLNAME = f"snippets/{SNIPPET_NAME}"
SNIPPET_BODY = f'#!/bin/sh\nexec {HOOK_PATH} "$@"\n'

# Storage types whose volumes are files under a path, and which may hold snippets
# (pve-storage: Dir, NFS, CIFS, CephFS, BTRFS plugins; GlusterFS until PVE 8).
DIR_TYPES = ("dir", "nfs", "cifs", "cephfs", "btrfs", "glusterfs")
SHARED_TYPES = ("nfs", "cifs", "cephfs", "glusterfs")

API_TIMEOUT = 120  # seconds per pvesh call (proxmoxer's default, 5 s, is too short)


# -- errors (exit codes are decided in cli.main) -------------------------------------

class NotRootError(PvehookError, PermissionError):
    exit_code = 4


class NotProxmoxError(PvehookError):
    exit_code = 5


class VmNotFoundError(PvehookError, LookupError):
    exit_code = 6


class StorageError(PvehookError):
    """No usable snippets storage: missing, not a directory storage, no snippets."""

    exit_code = 7


class HookscriptConflictError(PvehookError):
    """The VM already has another hookscript."""

    exit_code = 8


class ApiError(PvehookError):
    """Proxmox refused a request, or pvesh failed."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, status: int | None = None):
        super().__init__(message, hint)
        self.status = status


def is_ours(hookscript: str | None) -> bool:
    """A hookscript volume `<storage>:snippets/pvehook-hook` (on any storage)."""
    return bool(hookscript) and hookscript.partition(":")[2] == SNIPPET_VOLNAME


def snippet_volid(storage: str) -> str:
    return f"{storage}:{SNIPPET_VOLNAME}"


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError("this command must run as root (only root@pam may set a hookscript)",
                           hint="run it again with sudo, or as root on the Proxmox VE node")


def require_pvesh() -> None:
    if shutil.which("pvesh") is None:
        raise NotProxmoxError("not a Proxmox VE node: pvesh is not on PATH",
                              hint="run pvehook on a Proxmox VE node (package pve-manager)")


# -- the API ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Vm:
    vmid: int
    node: str
    type: str  # qemu | lxc
    name: str = ""
    status: str = ""


@dataclass(frozen=True)
class StorageInfo:
    id: str
    type: str
    content: tuple[str, ...]
    path: str | None
    nodes: tuple[str, ...] | None  # None: every node
    disabled: bool
    shared: bool

    @classmethod
    def from_api(cls, d: dict) -> "StorageInfo":
        content = tuple(c for c in str(d.get("content", "")).split(",") if c and c != "none")
        nodes = tuple(n for n in str(d["nodes"]).split(",") if n) if d.get("nodes") else None
        return cls(d["storage"], d.get("type", ""), content, d.get("path"), nodes,
                   bool(int(d.get("disable", 0) or 0)),
                   bool(int(d.get("shared", 0) or 0)) or d.get("type") in SHARED_TYPES)

    @property
    def is_dir(self) -> bool:
        return self.type in DIR_TYPES

    @property
    def has_snippets(self) -> bool:
        return "snippets" in self.content

    def on_node(self, node: str) -> bool:
        return not self.disabled and (self.nodes is None or node in self.nodes)


class Pve:
    """A thin, typed layer over proxmoxer's local backend; every failure is an ApiError."""

    def __init__(self, api=None):
        if api is None:
            require_pvesh()
            try:
                from proxmoxer import ProxmoxAPI
            except ImportError:
                raise NotProxmoxError(
                    "the Python module proxmoxer is missing",
                    hint="apt install python3-proxmoxer (Proxmox VE 9; PVE 8's 1.2.0 has no"
                         " local backend: pip install 'proxmoxer>=1.3')") from None
            try:
                api = ProxmoxAPI(backend="local", service="PVE", timeout=API_TIMEOUT)
            except (NotImplementedError, TypeError) as e:
                # proxmoxer < 1.3 has no local backend: 1.2 (PVE 8) takes "local" for an
                # unknown backend and fails for want of a host (TypeError).
                raise NotProxmoxError(f"proxmoxer cannot run pvesh: {e}",
                                      hint="install proxmoxer 1.3 or newer") from None
        self.api = api

    def _call(self, method: str, path: str, **kw):
        from proxmoxer.core import ResourceException

        try:
            return getattr(self.api(path.strip("/")), method)(**kw)
        except ResourceException as e:
            # pvesh's stderr starts with the code when the API gave one; proxmoxer
            # repeats it ("400 Bad Request: 400 Parameter verification failed.").
            content = re.sub(r"^\d{3} ", "", str(getattr(e, "content", "") or "").strip())
            why = f"{e.status_code} {e.status_message}: {content}" if content else str(e)
            raise ApiError(f"Proxmox refused {method.upper()} {path}: {_one_line(Exception(why))}",
                           status=e.status_code) from None
        except subprocess.TimeoutExpired:
            raise ApiError(f"pvesh {method} {path} did not answer within {API_TIMEOUT} s",
                           hint="is pve-cluster (pmxcfs) running and the cluster quorate?") from None
        except OSError as e:
            raise ApiError(f"cannot run pvesh for {path}: {e.strerror or e}",
                           hint="is this a Proxmox VE node?") from None

    def get(self, path: str, **params):
        return self._call("get", path, **params)

    def put(self, path: str, **data):
        return self._call("put", path, **data)

    # -- what pvehook asks -------------------------------------------------------------
    def vms(self) -> dict[int, Vm]:
        out = {}
        for r in self.get("/cluster/resources", type="vm") or []:
            if "vmid" in r:
                out[int(r["vmid"])] = Vm(int(r["vmid"]), r.get("node", ""), r.get("type", ""),
                                         r.get("name", "") or "", r.get("status", "") or "")
        return out

    def vm(self, vmid: int, vms: dict[int, Vm] | None = None) -> Vm:
        vm = (vms if vms is not None else self.vms()).get(vmid)
        if vm is None:
            raise VmNotFoundError(f"VM {vmid} does not exist in this cluster",
                                  hint="check the id with `qm list` or `pvesh get /cluster/resources --type vm`")
        if vm.type != "qemu":
            raise VmNotFoundError(f"{vmid} is a container ({vm.type}), not a VM",
                                  hint="pvehook manages QEMU VMs only")
        return vm

    def vm_config(self, vm: Vm) -> dict:
        return self.get(f"/nodes/{vm.node}/qemu/{vm.vmid}/config") or {}

    def set_hookscript(self, vm: Vm, volid: str, digest: str | None = None) -> None:
        self.put(f"/nodes/{vm.node}/qemu/{vm.vmid}/config", hookscript=volid, digest=digest)

    def delete_hookscript(self, vm: Vm, digest: str | None = None) -> None:
        self.put(f"/nodes/{vm.node}/qemu/{vm.vmid}/config", delete="hookscript", digest=digest)

    def storages(self) -> list[StorageInfo]:
        return [StorageInfo.from_api(d) for d in self.get("/storage") or []]

    def set_storage_content(self, storage: str, content: list[str]) -> None:
        self.put(f"/storage/{storage}", content=",".join(content))

    def has_snippet(self, node: str, storage: str) -> bool:
        vols = self.get(f"/nodes/{node}/storage/{storage}/content", content="snippets") or []
        return any(v.get("volid") == snippet_volid(storage) for v in vols)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def pvesm_path(volid: str) -> Path:
    """The file of a volume, as Proxmox resolves it (content-dirs, mount points...)."""
    if shutil.which("pvesm") is None:
        raise NotProxmoxError("not a Proxmox VE node: pvesm is not on PATH",
                              hint="run pvehook on a Proxmox VE node (package libpve-storage-perl)")
    try:
        proc = subprocess.run(["pvesm", "path", volid], capture_output=True, text=True,
                              timeout=API_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ApiError(f"pvesm path {volid} did not answer within {API_TIMEOUT} s") from None
    if proc.returncode != 0 or not proc.stdout.strip():
        raise ApiError(f"pvesm path {volid} failed: {_one_line(Exception(proc.stderr)) or 'no path'}")
    return Path(proc.stdout.strip().splitlines()[-1])


# -- the snippet -----------------------------------------------------------------------

def write_snippet(path: Path) -> bool:
    """Write the snippet atomically (temp file + rename), mode 0755; False: already there."""
    try:
        if path.read_text() == SNIPPET_BODY and os.access(path, os.X_OK) and path.is_file():
            return False
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError, IsADirectoryError):
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(SNIPPET_BODY)
                f.flush()
                os.fchmod(f.fileno(), 0o755)
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise StorageError(f"cannot write the snippet {path}: {e.strerror or e}",
                           hint="is the storage mounted and writable?") from None
    return True


# -- register / unregister ---------------------------------------------------------------

@dataclass
class Outcome:
    """What a register/unregister run did, VM by VM; reported even when it fails."""

    storage: str | None = None
    snippet: str | None = None  # the file
    snippet_written: bool = False
    content_enabled: bool = False
    done: list[dict] = field(default_factory=list)  # {vmid, node, action, old}
    warnings: list[str] = field(default_factory=list)
    error: PvehookError | None = None
    pins: list[str] = field(default_factory=list)  # what register pinned (issue 13)

    def as_dict(self) -> dict:
        return {"storage": self.storage, "snippet": self.snippet,
                "snippet_written": self.snippet_written,
                "snippets_enabled": self.content_enabled, "vms": self.done,
                "warnings": self.warnings, "error": str(self.error) if self.error else None,
                "pins": self.pins}


def choose_storage(storages: list[StorageInfo], node: str, wanted: str | None,
                   enable: bool, vmids: str = "<vmid>") -> StorageInfo:
    by_id = {s.id: s for s in storages}
    if wanted is not None:
        s = by_id.get(wanted)
        if s is None:
            raise StorageError(f"storage '{wanted}' does not exist",
                               hint="see `pvesm status` for the storages of this node")
        if not s.is_dir:
            dirs = ", ".join(x.id for x in storages if x.is_dir and x.on_node(node)) or "none"
            raise StorageError(
                f"storage '{wanted}' is of type {s.type}, not a directory storage; a hookscript"
                f" must be a file in a directory storage's snippets",
                hint=f"use --storage with a directory storage (here: {dirs})")
        if not s.on_node(node):
            raise StorageError(f"storage '{wanted}' is disabled or not available on node {node}",
                               hint=f"enable it for {node} (pvesm set {wanted} --disable 0 / --nodes)")
        if not s.has_snippets and not enable:
            raise StorageError(f"storage '{wanted}' does not allow snippets (content:"
                               f" {','.join(s.content) or 'none'})", hint=_enable_hint(s, vmids))
        return s
    usable = [s for s in storages if s.is_dir and s.on_node(node) and s.has_snippets]
    if usable:
        return usable[0]
    dirs = [s for s in storages if s.is_dir and s.on_node(node)]
    if not dirs:
        raise StorageError(f"node {node} has no directory storage for snippets",
                           hint="add one: pvesm add dir <id> --path <dir> --content snippets")
    pick = next((s for s in dirs if s.id == "local"), dirs[0])
    raise StorageError("no directory storage on this node allows snippets", hint=_enable_hint(pick, vmids))


def _enable_hint(s: StorageInfo, vmids: str) -> str:
    content = ",".join([*s.content, "snippets"])
    return (f"run `pvehook register {vmids} --enable-snippets {s.id}`, or"
            f" `pvesm set {s.id} --content {content}` (keeps its other content types)")


def preflight(pve: Pve, vmids: list[int], force: bool, for_register: bool
              ) -> tuple[dict[int, Vm], list[tuple[Vm, dict]]]:
    """Every VM exists and may be changed; nothing is changed before all pass."""
    vms = pve.vms()
    targets = []
    for vmid in vmids:
        vm = pve.vm(vmid, vms)
        conf = pve.vm_config(vm)
        old = conf.get("hookscript")
        if for_register and old and not is_ours(old) and not force:
            raise HookscriptConflictError(
                f"VM {vmid} already has the hookscript {old}",
                hint="pvehook does not chain hookscripts; use --force to replace it")
        targets.append((vm, conf))
    return vms, targets


def register(pve: Pve, root, vmids: list[int], local_node: str, storage: str | None = None,
             enable_snippets: str | None = None, force: bool = False) -> Outcome:
    out = Outcome()
    vms, targets = preflight(pve, vmids, force, for_register=True)
    storages = pve.storages()
    chosen = choose_storage(storages, local_node, enable_snippets or storage,
                            enable=enable_snippets is not None,
                            vmids=" ".join(map(str, vmids)))
    out.storage = chosen.id
    volid = snippet_volid(chosen.id)
    try:
        if not chosen.has_snippets:
            pve.set_storage_content(chosen.id, [*chosen.content, "snippets"])
            out.content_enabled = True
        path = pvesm_path(volid)
        out.snippet = str(path)
        out.snippet_written = write_snippet(path)
        for vm, conf in targets:
            old = conf.get("hookscript")
            if old == volid:
                out.done.append({"vmid": vm.vmid, "node": vm.node, "action": "unchanged", "old": old})
                continue
            pve.set_hookscript(vm, volid, conf.get("digest"))
            out.done.append({"vmid": vm.vmid, "node": vm.node, "action": "registered", "old": old})
    except PvehookError as e:
        out.error = e
        return out
    _pin_registered(root, local_node, [vm for vm, _conf in targets], out)
    from .report import registered_vms

    out.warnings.extend(snippet_gaps(pve, storages, local_node, registered_vms(root)))
    return out


def _pin_registered(root, local_node: str, vms: list[Vm], out: Outcome) -> None:
    """Pin the drives of the registered VMs of this node whose entries have no pin yet;
    pins are node-local, so VMs elsewhere are pinned at their first start there."""
    from .context import Context
    from .pins import pin_new

    ctx = Context(root=root, node=local_node)
    for vm in vms:
        if vm.node != local_node:
            out.pins.append(f"VM {vm.vmid} on {vm.node}: its drives are pinned at its first"
                            f" start there (pins are node-local)")
            continue
        try:
            done = pin_new(ctx, vm.vmid, "register")
        except (PvehookError, OSError) as e:
            out.warnings.append(f"VM {vm.vmid}: drives not pinned now ({e}); they are pinned"
                                " at its first start")
            continue
        for d in done:
            if "skipped" in d:
                out.pins.append(f"VM {vm.vmid} {d['key']}: {d['address']} not pinned now"
                                f" ({d['skipped']}); pinned at its first start")
            else:
                out.pins.append(f"VM {vm.vmid} {d['key']}: pinned {d['description']} at"
                                f" {d['address']}")


def unregister(pve: Pve, vmids: list[int]) -> Outcome:
    out = Outcome()
    _, targets = preflight(pve, vmids, force=False, for_register=False)
    try:
        for vm, conf in targets:
            old = conf.get("hookscript")
            if not old:
                out.done.append({"vmid": vm.vmid, "node": vm.node, "action": "not registered", "old": None})
            elif not is_ours(old):
                out.done.append({"vmid": vm.vmid, "node": vm.node, "action": "left alone", "old": old})
                out.warnings.append(f"VM {vm.vmid} has another hookscript ({old}): left as it is")
            else:
                pve.delete_hookscript(vm, conf.get("digest"))
                out.done.append({"vmid": vm.vmid, "node": vm.node, "action": "unregistered", "old": old})
    except PvehookError as e:
        out.error = e
    return out


def snippet_gaps(pve: Pve, storages: list[StorageInfo], local_node: str,
                 registered: list[tuple[int, str, str]]) -> list[str]:
    """Warnings for each node where a VM with our hookscript lives but the snippet is
    missing there (Proxmox checks the script at every start: that VM cannot start)."""
    by_id = {s.id: s for s in storages}
    wanted: dict[tuple[str, str], list[int]] = {}  # (node, volid) -> vmids
    for vmid, node, volid in registered:
        wanted.setdefault((node, volid), []).append(vmid)
    warnings = []
    for (node, volid), ids in sorted(wanted.items()):
        storage = volid.partition(":")[0]
        s = by_id.get(storage)
        try:
            if s is None or not s.on_node(node):
                present = False
            elif node == local_node:
                path = pvesm_path(volid)
                present = path.is_file() and os.access(path, os.X_OK)
            else:
                present = pve.has_snippet(node, storage)
        except PvehookError as e:
            warnings.append(f"cannot look for {volid} on node {node}: {e}")
            continue
        if not present:
            vms = " ".join(map(str, sorted(ids)))
            warnings.append(
                f"node {node} has no {volid}, but VM {vms} with that hookscript lives there and"
                f" cannot start; install pvehook on {node} and run `pvehook register {vms}` there")
    return warnings
