"""`pvehook register` / `unregister`: the snippet that runs the installed hook, and each
VM's `hookscript` setting, changed through the API only after every VM passed.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import click

from ..errors import HookscriptConflictError, PvehookError, StorageError, UsageError
from .api import Pve, StorageInfo, Vm, pvesm_path, require_root
from .configs import SNIPPET_BODY, context, is_ours, registered_vms, snippet_volid
from .entry import VMID, cli, emit_json, json_option, vmid_completion

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
    pins: list[str] = field(default_factory=list)  # what register pinned

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


def register_vms(pve: Pve, root, vmids: list[int], local_node: str, storage: str | None = None,
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
    out.warnings.extend(snippet_gaps(pve, storages, local_node, registered_vms(root)))
    return out


def _pin_registered(root, local_node: str, vms: list[Vm], out: Outcome) -> None:
    """Pin the drives of the registered VMs of this node whose entries have no pin yet;
    pins are node-local, so VMs elsewhere are pinned at their first start there."""
    from ..context import Context
    from ..pins import pin_new

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


def unregister_vms(pve: Pve, vmids: list[int]) -> Outcome:
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


def api():
    require_root()
    return Pve()


def print_outcome(out, as_json: bool, verb: str) -> int:
    if as_json:
        emit_json(out.as_dict())
    else:
        if out.content_enabled:
            click.echo(f"storage {out.storage}: snippets content enabled")
        if out.snippet:
            click.echo(f"snippet {out.snippet}: {'written' if out.snippet_written else 'up to date'}")
        for d in out.done:
            extra = f" (was {d['old']})" if d["action"] == "registered" and d["old"] else ""
            click.echo(f"VM {d['vmid']} on {d['node']}: {d['action']}{extra}")
        for line in out.pins:
            click.echo(line)
        for w in out.warnings:
            click.echo(f"pvehook: warning: {w}", err=True)
    if out.error is None:
        return 0
    done = [str(d["vmid"]) for d in out.done if d["action"] in ("registered", "unregistered")]
    state = []
    if out.content_enabled:
        state.append(f"snippets content was enabled on {out.storage}")
    if out.snippet_written:
        state.append(f"the snippet {out.snippet} was written")
    state.append(f"VM {', '.join(done)} {verb}" if done else f"no VM was {verb}")
    out.error.args = (f"{out.error.args[0]} ({'; '.join(state)})",)
    raise out.error


@cli.command(epilog="""\b
Examples:
  pvehook register 100
  pvehook register 100 101 --storage nfs-shared
  pvehook register 100 --enable-snippets local
  pvehook register 100 --force      replace another hookscript""")
@click.argument("vmids", nargs=-1, required=True, type=VMID, shell_complete=vmid_completion)
@click.option("--storage", metavar="S", help="Directory storage for the snippet"
              " (default: the first one with snippets content).")
@click.option("--enable-snippets", metavar="S", help="Add 'snippets' to storage S's content"
              " (keeping its other types) and use it.")
@click.option("--force", is_flag=True, help="Replace a hookscript that is not pvehook's.")
@json_option
@click.pass_context
def register(cctx, vmids, storage, enable_snippets, force, as_json):
    """Set pvehook as the hookscript of VMs (on any node of the cluster).

    Writes the snippet pvehook-hook (a two-line script that runs the installed hook) to a
    directory storage with snippets content, then sets each VM's hookscript to it.
    """
    if storage and enable_snippets and storage != enable_snippets:
        raise UsageError("--storage and --enable-snippets name different storages")
    pve = api()
    ctx = context()
    out = register_vms(pve, ctx.root, list(dict.fromkeys(vmids)), ctx.node, storage,
                      enable_snippets, force)
    from ..reserve import list_guest_controllers

    list_guest_controllers(ctx, [d["vmid"] for d in out.done if d["action"] == "registered"])
    cctx.exit(print_outcome(out, as_json, "registered"))


@cli.command(epilog="\b\nExample:\n  pvehook unregister 100 101")
@click.argument("vmids", nargs=-1, required=True, type=VMID, shell_complete=vmid_completion)
@json_option
@click.pass_context
def unregister(cctx, vmids, as_json):
    """Remove pvehook as the hookscript of VMs (another hookscript is left alone)."""
    out = unregister_vms(api(), list(dict.fromkeys(vmids)))
    cctx.exit(print_outcome(out, as_json, "unregistered"))
