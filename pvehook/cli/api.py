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
from dataclasses import dataclass
from pathlib import Path

from ..errors import ApiError, NotProxmoxError, NotRootError, VmNotFoundError
from ..storagecfg import DIR_TYPES, SHARED_TYPES, serves_node
from .configs import snippet_volid

API_TIMEOUT = 120  # seconds per pvesh call (proxmoxer's default, 5 s, is too short)


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError("this command must run as root (only root@pam may set a hookscript)",
                           hint="run it again with sudo, or as root on the Proxmox VE node")


def require_pvesh() -> None:
    if shutil.which("pvesh") is None:
        raise NotProxmoxError("not a Proxmox VE node: pvesh is not on PATH",
                              hint="run pvehook on a Proxmox VE node (package pve-manager)")


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
        return serves_node(self.disabled, self.nodes, node)


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
            raise ApiError(f"Proxmox refused {method.upper()} {path}: {one_line(Exception(why))}",
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


def one_line(e: Exception) -> str:
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
        raise ApiError(f"pvesm path {volid} failed: {one_line(Exception(proc.stderr)) or 'no path'}")
    return Path(proc.stdout.strip().splitlines()[-1])
