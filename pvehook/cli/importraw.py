"""`pvehook import-raw`: copy a whole disk into a RAW volume of a VM, the safe way.

What admins otherwise do by hand, `qm importdisk <vmid> /dev/nvme0n1 local-lvm --format raw`
then `qm set <vmid> -scsi0 local-lvm:vm-<vmid>-disk-0,cache=writeback,discard=on`, done as one
Proxmox request after checking what those commands do not:

- the VM is on this node (the disk is here), stopped (API status/current) and not locked;
- the source is a whole block device (symlinks such as /dev/disk/by-id/... resolved) and
  the host does not use it: pvehook.usage.host_use, the same checks as the passthrough
  path (mounts through any stack, swap, holders, the O_EXCL probe, never / or /boot);
- it does not start with a disk-image or LUKS header: Proxmox passes a device path to
  qemu-img without `-f`, so such a header would be probed and read as that format, not raw
  (a first sector that cannot be read fails the check);
- from the checks to the end of the copy it holds the lock of the source's controller
  (/run/pvehook/locks/<address>.lock, with filelock; the hook flocks the same file), so
  no VM start can take the disk mid-copy;
- the target storage is lvm/lvmthin (storage.cfg), has `images` content, is on this node.

Facts used (qemu-server 9.2.6 src/PVE/API2/Qemu.pm, QemuServer/ImportDisk.pm,
QemuServer/QemuImage.pm; pve-storage 9.1.7 Storage.pm, Plugin.pm; pve-common
RESTEnvironment.pm, Tools.pm; pve-manager PVE/CLI/pvesh.pm, PVE/API2/Tasks.pm):

- POST /nodes/{node}/qemu/{vmid}/config with `<disk>=<storage>:0,import-from=<abs path>`
  (check_drive_param: "'import-from' requires special syntax - use <storage ID>:0,
  import-from=<source>"); an absolute path needs root@pam (check_volume_access: "Only root
  can pass arbitrary filesystem paths."); it must be a file or block device
  (abs_filesystem_path with allow_blockdev). The worker allocates vm-<vmid>-disk-<N>
  (vdisk_alloc), runs `qemu-img convert -p -n` (no `-f` for a device path: the format is
  probed) printing "transferred X of Y (p%)" lines, frees the volume on failure, then
  sets the disk with size= and without import-from/format. `format=raw` is the target's.
- The POST forks a worker and returns its UPID. Under pvesh (a CLI environment) the worker
  runs in the foreground: its output goes to pvesh's stdout as it happens, a task error to
  stderr, and the UPID is printed last with exit 0 even when the task failed. So this call
  runs pvesh itself and streams its stdout (proxmoxer buffers the output and cannot
  decode the mixed text); the result is then read from GET /nodes/{node}/tasks/{upid}/status
  ({"status": "running"|"stopped", "exitstatus": "OK"|"WARNINGS: n"|<error>}). Should the
  task still run (proxied or daemon environments), its log is polled with
  GET .../tasks/{upid}/log?start=N&limit=0 ([{"n": 1, "t": "..."}]; limit 0 reads to the
  end; an empty log reads as [{"n": 1, "t": "no content"}]) at a bounded interval.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click

from .. import exitcodes as codes
from ..block import BlockDevice
from ..context import Context
from ..errors import (
    ApiError, HookscriptConflictError, ImageHeaderError, InUseError, StorageError, TaskError,
    UsageError, VmBusyError,
)
from ..storagecfg import LVM_TYPES, load_storage_cfg
from ..units import human_size
from ..vmconfig import DISK_KEYS
from .api import Pve, Vm, one_line
from .configs import context, snippet_volid
from .entry import VMID, cli, emit_json, json_option, vmid_completion
from .register import api, choose_storage, preflight, print_outcome, register_vms

CACHE_MODES = ("none", "writethrough", "writeback", "directsync", "unsafe")


IMPORT_KEYS = tuple(k for k in DISK_KEYS if k not in ("efidisk0", "tpmstate0"))


POLL_MIN, POLL_MAX = 0.5, 5.0  # seconds between task-status polls (async tasks only)


_UPID_LINE_RE = re.compile(r'^"(UPID:[^"]+)"$')


_BUS_RE = re.compile(r"^([a-z]+)(\d+)$")
_PCI_RE = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")


# Headers qemu-img's format probes recognise at the start of a device (block/*.c probe
# functions); a raw disk starting with one would be read as that format, not copied.
_HEADERS = (
    (0, b"QFI\xfb", "qcow2/qcow"),
    (0, b"QED\x00", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk descriptor"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc/vhd"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop", "cloop"),
    (0, b"LUKS\xba\xbe", "LUKS"),
)


@dataclass(frozen=True)
class Source:
    given: str  # what the user passed
    path: str  # /dev/<kernel name>, what Proxmox gets
    device: BlockDevice
    size: int  # bytes


@dataclass
class Plan:
    vm: Vm
    key: str
    source: Source
    storage: str
    storage_desc: str
    option: str  # the disk option sent to Proxmox
    attach_opts: str  # cache=...,discard=... (what ends up next to the volume)
    hookscript: str | None  # the snippet volume to register, None: --no-register
    lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    locks: list = field(default_factory=list)  # the source controller's, until the copy ends

    def release(self) -> None:
        release(self.locks)

    @property
    def api_path(self) -> str:
        return f"/nodes/{self.vm.node}/qemu/{self.vm.vmid}/config"

    @property
    def pvesh_argv(self) -> list[str]:
        return ["pvesh", "create", self.api_path, f"-{self.key}", self.option]

    def as_dict(self) -> dict:
        return {"vmid": self.vm.vmid, "node": self.vm.node, "key": self.key,
                "source": self.source.given, "device": self.source.path,
                "size_bytes": self.source.size, "storage": self.storage,
                "option": self.option, "hookscript": self.hookscript,
                "lines": self.lines, "notes": self.notes}


def _whole_disks(ctx: Context) -> list[str]:
    try:
        names = sorted(os.listdir(ctx.root.sys("block")))
    except FileNotFoundError:
        return []
    return [f"/dev/{n}" for n in names if n.startswith(("nvme", "sd", "vd"))]


def _suggest(ctx: Context) -> str:
    disks = ", ".join(_whole_disks(ctx)[:6])
    return ("pass a whole disk, e.g. /dev/disk/by-id/nvme-<model>_<serial>"
            + (f" (here: {disks})" if disks else "")
            + "; `lsblk -d -o NAME,SIZE,MODEL,SERIAL` lists them")


def resolve_source(ctx: Context, given: str) -> Source:
    """The whole block device named by `given` (a /dev path or a symlink to one)."""
    root = ctx.root
    if not given.startswith("/"):
        hint = (f"pass /dev/{given}" if root.dev(given).exists() else _suggest(ctx))
        raise UsageError(f"source {given!r} is not an absolute path", hint=hint)
    where = root.path / given.lstrip("/")
    if not os.path.lexists(where):
        raise UsageError(f"source {given} does not exist", hint=_suggest(ctx))
    real = Path(os.path.realpath(where))
    try:
        rel = real.relative_to(root.dev())
    except ValueError:
        rel = None
    if real.is_dir():
        raise UsageError(f"source {given} is a directory, not a block device", hint=_suggest(ctx))
    if rel is None or len(rel.parts) != 1 or not root.sys("class", "block", rel.name).exists():
        if real.is_file() and rel is None:
            raise UsageError(
                f"source {given} is a file, not a block device",
                hint=f"import image files with `qm disk import <vmid> {given} <storage>`;"
                     " import-raw copies whole disks")
        raise UsageError(f"source {given} is not a block device the kernel knows",
                         hint=_suggest(ctx))
    name = rel.name
    dev = BlockDevice.by_name(root, name)
    try:
        mode = os.stat(real).st_mode
    except OSError as e:
        raise UsageError(f"cannot stat {given}: {e.strerror or e}", hint=_suggest(ctx)) from None
    if stat.S_ISBLK(mode):
        rdev = os.stat(real).st_rdev
        if f"{os.major(rdev)}:{os.minor(rdev)}" != dev.devnum:
            raise UsageError(f"{given} is not the kernel's {name} (device number"
                             f" {os.major(rdev)}:{os.minor(rdev)}, sysfs {dev.devnum})",
                             hint="is /dev stale? `udevadm trigger` recreates it")
    elif stat.S_ISCHR(mode) or root.path == Path("/"):
        # (the fast tests' trees have plain files as device nodes)
        raise UsageError(f"source {given} is not a block device", hint=_suggest(ctx))
    if dev.is_partition:
        parent = dev.sys_path.parent.name
        raise UsageError(
            f"source {given} is the partition {name} of /dev/{parent}, not a whole disk",
            hint=f"pass the whole disk /dev/{parent} (its partition table and every partition"
                 " are copied with it)")
    try:
        size = int((dev.sys_path / "size").read_text().strip()) * 512
    except (OSError, ValueError):
        size = 0
    if size == 0:
        raise UsageError(f"source {given} ({name}) has size 0 (no medium?)", hint=_suggest(ctx))
    return Source(given, f"/dev/{name}", dev, size)


def image_header(path: Path) -> str | None:
    """The format whose header starts the device, when qemu-img would probe one.
    A device whose first sector cannot be read fails the check (ImageHeaderError)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise ImageHeaderError(
            f"cannot read the first sector of {path} to check it for a disk-image or LUKS"
            f" header: {e.strerror or e}",
            hint="import-raw copies only a disk it has checked; see the kernel log (dmesg)"
                 " for the disk's errors") from None
    for offset, magic, fmt in _HEADERS:
        if head[offset:offset + len(magic)] == magic:
            return fmt
    return None


def source_controllers(ctx: Context, src: Source) -> list[str]:
    """The PCI functions the source disk hangs off: its controller, or every path's
    controller of a native-multipath head (/sys/devices/virtual/nvme-subsystem/...)."""
    real = Path(os.path.realpath(src.device.sys_path))
    found = [p for p in real.parts if _PCI_RE.fullmatch(p)]
    if found:
        return [found[-1]]
    out = set()
    try:
        names = os.listdir(real.parent)
    except OSError:
        return []
    for name in names:  # nvme-subsysN/nvmeM: the controllers of the subsystem
        if re.fullmatch(r"nvme\d+", name):
            ctrl = [p for p in Path(os.path.realpath(real.parent / name)).parts
                    if _PCI_RE.fullmatch(p)]
            if ctrl:
                out.add(ctrl[-1])
    return sorted(out)


def lock_source(ctx: Context, src: Source) -> list:
    """Take the lock of the source's controller(s), the file the hook flocks for that
    device, with filelock (its UnixFileLock flocks it the same way): no VM can take
    the disk while it is checked and copied. Returns the held locks."""
    from filelock import FileLock, Timeout

    from ..errors import HeldByOtherVMError
    from ..records import lock_path, open_state_dir

    os.close(open_state_dir(ctx.root, ctx.root.lock_dir.name))  # ours alone, or refused
    held: list = []
    try:
        for addr in source_controllers(ctx, src):
            lock = FileLock(str(lock_path(ctx.root, addr)))
            try:
                lock.acquire(timeout=ctx.timeouts.lock)
            except Timeout:
                raise HeldByOtherVMError(
                    f"{src.path}: its controller {addr} is locked by a pvehook run (a VM"
                    " starting or stopping with it)",
                    hint="wait until that VM has started or stopped, then retry") from None
            held.append(lock)
    except BaseException:
        release(held)
        raise
    return held


def release(locks: list) -> None:
    for lock in reversed(locks):
        lock.release()
    locks.clear()


def check_source(ctx: Context, src: Source) -> tuple[list[str], list[str]]:
    """(lines, notes) for a source the host does not use; raises when it does."""
    from ..usage import host_use

    use = host_use(ctx.root, ctx.kernel, [src.device])
    if use.in_use:
        raise InUseError(
            f"the host uses {src.path}: " + "; ".join(use.reasons),
            hint="stop that use first (umount, swapoff, `vgchange -an <vg>`, `zpool export`,"
                 " stop the VM or process that has it open); import-raw never copies a disk"
                 " the host is using")
    fmt = image_header(src.device.dev_path)
    if fmt is not None:
        raise ImageHeaderError(
            f"{src.path} starts with a {fmt} header: Proxmox hands a device path to qemu-img"
            f" without a format, which would read it as {fmt} instead of copying it raw",
            hint=f"copy it yourself: create the volume, then `qemu-img convert -p -f raw -O raw"
                 f" {src.path} <LV path>` and attach it with `qm set`")
    via = f" (from {src.given})" if src.given != src.path else ""
    lines = [f"source {src.path}{via}: whole disk, {human_size(src.size)},"
             " not used by the host"]
    return lines, list(use.notes)


def check_storage(ctx: Context, sid: str) -> str:
    """A description of the lvm/lvmthin storage `sid`; raises StorageError otherwise."""
    storages = load_storage_cfg(ctx.root)
    s = storages.get(sid)
    lvm = ", ".join(x.id for x in storages.values() if x.type in LVM_TYPES) or "none"
    if s is None:
        raise StorageError(f"storage '{sid}' does not exist",
                           hint=f"LVM storages in /etc/pve/storage.cfg: {lvm}")
    if s.type not in LVM_TYPES:
        raise StorageError(
            f"storage '{sid}' is of type {s.type}, not lvm or lvmthin; import-raw writes RAW"
            " LVM volumes only", hint=f"pick an LVM storage ({lvm}), or use `qm disk import`")
    content = (s.options.get("content") or "images").split(",")  # LVM plugins' default
    if "images" not in content:
        raise StorageError(f"storage '{sid}' does not allow disk images (content:"
                           f" {','.join(content)})",
                           hint=f"pvesm set {sid} --content {','.join([*content, 'images'])}")
    if not s.on_node(ctx.node):
        raise StorageError(f"storage '{sid}' is disabled or not available on node {ctx.node}",
                           hint=f"enable it for {ctx.node} (pvesm set {sid} --disable 0 / --nodes)")
    if not s.vgname:
        raise StorageError(f"storage '{sid}' ({s.type}) has no vgname")
    pool = f", thin pool {s.thinpool}" if s.type == "lvmthin" else ""
    return f"{s.type}, volume group {s.vgname}{pool}"


def _free_key(conf: dict, key: str) -> str | None:
    m = _BUS_RE.match(key)
    bus = m[1] if m else "scsi"
    return next((k for k in IMPORT_KEYS if _BUS_RE.match(k)[1] == bus and k not in conf), None)


def plan_import(pve: Pve, ctx: Context, vmid: int, source: str, storage: str, key: str = "scsi0",
                cache: str | None = "writeback", discard: bool = True, register: bool = True,
                snippets_storage: str | None = None) -> Plan:
    """Every check, nothing changed: the plan, or the first refusal raised."""
    if key not in IMPORT_KEYS:
        raise UsageError(f"--bus {key} is not a disk slot",
                         hint="one of ide0-3, sata0-5, scsi0-30, virtio0-15")
    src = resolve_source(ctx, source)
    vms = pve.vms()
    vm = pve.vm(vmid, vms)
    if vm.node != ctx.node:
        raise VmBusyError(
            f"VM {vmid} lives on node {vm.node}, the disk {src.path} on {ctx.node}",
            hint=f"migrate VM {vmid} to {ctx.node} (`qm migrate {vmid} {ctx.node}` on"
                 f" {vm.node}), or run import-raw on the node that has the disk")
    state = pve.get(f"/nodes/{vm.node}/qemu/{vmid}/status/current") or {}
    if state.get("status") != "stopped":
        raise VmBusyError(f"VM {vmid} is {state.get('status') or 'in an unknown state'}",
                          hint=f"shut it down first (`qm shutdown {vmid}`); a disk is imported"
                               " into a stopped VM only")
    conf = pve.vm_config(vm)
    if conf.get("lock"):
        raise VmBusyError(f"VM {vmid} is locked ({conf['lock']})",
                          hint="wait for that operation to end, or `qm unlock` if none runs")
    if key in conf:
        free = _free_key(conf, key)
        raise UsageError(f"VM {vmid} already has {key}: {conf[key]}",
                         hint=f"pass --bus {free}" if free else "pass a free --bus slot")
    desc = check_storage(ctx, storage)
    # From here to the end of the copy (run_import) no VM can take the source's controller.
    locks = lock_source(ctx, src)
    try:
        return _plan(pve, ctx, vm, vmid, conf, key, src, storage, desc, cache, discard,
                     register, snippets_storage, locks)
    except BaseException:
        release(locks)
        raise


def _plan(pve, ctx, vm, vmid, conf, key, src, storage, desc, cache, discard, register,
          snippets_storage, locks) -> Plan:
    lines, notes = check_source(ctx, src)
    hookscript = None
    if register:
        try:
            preflight(pve, [vmid], force=False, for_register=True)
        except HookscriptConflictError as e:
            e.hint = (f"pvehook does not chain hookscripts; pass --no-register to import"
                      f" anyway (`pvehook register {vmid} --force` replaces it later)")
            raise
        try:
            chosen = choose_storage(pve.storages(), ctx.node, snippets_storage, enable=False,
                                    vmids=str(vmid))
        except StorageError as e:
            e.hint = f"{e.hint}; or pass --no-register" if e.hint else "or pass --no-register"
            raise
        hookscript = snippet_volid(chosen.id)
    attach = ",".join(([f"cache={cache}"] if cache else []) + (["discard=on"] if discard else []))
    option = f"{storage}:0,import-from={src.path},format=raw" + (f",{attach}" if attach else "")
    plan = Plan(vm, key, src, storage, desc, option, attach, hookscript, locks=locks)
    plan.lines = [f"VM {vmid} on {vm.node}: stopped, {key} is free", *lines,
                  f"storage {storage}: {desc}"]
    plan.notes = notes
    if cache == "writeback":
        plan.notes.append(f"{key}: cache=writeback needs protected power (UPS, or an SSD with"
                          " power-loss protection): a power loss can lose writes the guest"
                          " believes are on disk")
    order = dict(kv.partition("=")[::2] for kv in (conf.get("boot") or "").split(",")).get("order")
    if order is not None and key not in order.split(";"):
        plan.notes.append(f"{key} is not in VM {vmid}'s boot order ({order}); `qm set {vmid}"
                          f" --boot order={';'.join([key, *order.split(';')])}` boots from it")
    return plan


def _run_pvesh(plan: Plan, echo: Callable[[str], None]) -> tuple[str | None, int, str]:
    """Run the POST, printing the task's output as it comes: (UPID, exit code, stderr)."""
    argv = [*plan.pvesh_argv, "--output-format", "json"]
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, bufsize=1)
    except OSError as e:
        raise ApiError(f"cannot run pvesh: {e.strerror or e}",
                       hint="is this a Proxmox VE node?") from None
    err: list[str] = []
    drain = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    drain.start()
    upid = None
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            m = _UPID_LINE_RE.match(line.strip())
            if m:
                upid = m[1]
            elif line.strip():
                echo(f"  {line.strip()}")
        rc = proc.wait()
    except KeyboardInterrupt:
        # pvesh got the SIGINT too and stops the worker, which frees the new volume.
        echo("interrupted: waiting for Proxmox to stop the import and clean up")
        rc = proc.wait()
        drain.join(5)
        raise
    drain.join(5)
    return upid, rc, "".join(err)


def _wait_task(pve: Pve, node: str, upid: str, echo: Callable[[str], None],
               sleep: Callable[[float], None] = time.sleep) -> str:
    """The task's exit status; prints new log lines while it runs (bounded interval)."""
    seen, interval = 0, POLL_MIN
    while True:
        status = pve.get(f"/nodes/{node}/tasks/{upid}/status") or {}
        running = status.get("status") == "running"
        if running or seen:
            lines = pve.get(f"/nodes/{node}/tasks/{upid}/log", start=seen, limit=0) or []
            if not (seen == 0 and len(lines) == 1 and lines[0].get("t") == "no content"):
                for item in lines:
                    if int(item.get("n", 0)) > seen:
                        seen = int(item["n"])
                        if item.get("t", "").strip():
                            echo(f"  {item['t'].strip()}")
        if not running:
            return str(status.get("exitstatus") or "unknown")
        sleep(interval)
        interval = min(interval * 2, POLL_MAX)


def run_import(pve: Pve, plan: Plan, echo: Callable[[str], None]) -> dict:
    """The import itself; returns what was done. Raises ApiError/TaskError on failure.
    The source controller's lock (plan_import) is let go when the copy has ended."""
    try:
        return _run_import(pve, plan, echo)
    finally:
        plan.release()


def _run_import(pve: Pve, plan: Plan, echo: Callable[[str], None]) -> dict:
    node, vmid = plan.vm.node, plan.vm.vmid
    echo(f"importing {plan.source.path} ({human_size(plan.source.size)}) as RAW into"
         f" {plan.storage}, as {plan.key} of VM {vmid}")
    upid, rc, err = _run_pvesh(plan, echo)
    if rc != 0 or upid is None:
        why = one_line(Exception(err)) or (f"pvesh exited with {rc}" if rc else "no task id")
        raise ApiError(f"Proxmox refused POST {plan.api_path} {plan.key}: {why}",
                       hint="nothing was imported")
    # A task of a foreground pvesh has ended here; anything else is polled until it ends.
    exitstatus = _wait_task(pve, node, upid, echo)
    log = f"pvesh get /nodes/{node}/tasks/{upid}/log"
    if exitstatus != "OK" and not exitstatus.startswith("WARNINGS"):
        raise TaskError(f"the import task failed: {exitstatus}",
                        hint=f"Proxmox frees the volume it allocated; nothing was attached; the"
                             f" task log: `{log}`")
    conf = pve.vm_config(plan.vm)
    value = conf.get(plan.key, "")
    if not value.startswith(f"{plan.storage}:") or "import-from" in value:
        raise TaskError(f"the import task ended ({exitstatus}) but {plan.key} of VM {vmid} is"
                        f" {value or 'not set'}", hint=f"see the task log: `{log}`")
    warnings = [f"the task ended with {exitstatus.lower()}: `{log}`"] if exitstatus != "OK" else []
    return {"upid": upid, "exitstatus": exitstatus, "config": value,
            "volume": value.split(",")[0], "warnings": warnings}


@cli.command("import-raw", epilog="""\b
Examples:
  pvehook import-raw 100 /dev/disk/by-id/nvme-Samsung_SSD_990_PRO_S7X local-lvm
  pvehook import-raw 100 /dev/nvme1n1 local-lvm --bus scsi1 --cache none --dry-run

\b
The same as `qm importdisk 100 /dev/nvme1n1 local-lvm --format raw` followed by
`qm set 100 -scsi0 local-lvm:vm-100-disk-0,cache=writeback,discard=on`, as one
Proxmox request (POST /nodes/<node>/qemu/100/config -scsi0
local-lvm:0,import-from=/dev/nvme1n1,format=raw,...), after checking that the VM is
stopped, the host does not use the disk and the storage is LVM.

\b
""" + codes.summary([
    (codes.OK, "done"), (codes.ERROR, "Proxmox refused or the import task failed"),
    (codes.USAGE, "bad usage (the source is not a whole block device, the slot is taken)"),
    (codes.NOT_ROOT, "not root"), (codes.NOT_PROXMOX, "not a Proxmox VE node"),
    (codes.NO_VM, "no such VM"),
    (codes.STORAGE, "storage missing, not lvm/lvmthin, or no snippets storage to register"
                    " the hookscript"),
    (codes.HOOKSCRIPT_CONFLICT, "the VM has another hookscript (--no-register)"),
    (codes.IN_USE, "the host uses the source disk"),
    (codes.HELD, "a VM starting or stopping holds the source controller's lock"),
    (codes.VM_BUSY, "the VM is running, locked or on another node"),
    (codes.IMAGE_HEADER, "the source starts with a disk-image or LUKS header, or its first"
                         " sector cannot be read")]))
@click.argument("vmid", type=VMID, shell_complete=vmid_completion)
@click.argument("source", metavar="SOURCE_DISK")
@click.argument("storage")
@click.option("--bus", "key", default="scsi0", show_default=True, metavar="SLOT",
              help="Disk slot of the VM to attach it to (scsiN, virtioN, sataN, ideN).")
@click.option("--cache", type=click.Choice(["writeback", "none", "writethrough", "directsync",
                                            "unsafe", "default"]),
              default="writeback", show_default=True,
              help="Cache mode of the new disk ('default': leave it to Proxmox).")
@click.option("--no-discard", is_flag=True, help="Do not set discard=on.")
@click.option("--no-register", is_flag=True, help="Do not set pvehook as the VM's hookscript.")
@click.option("--snippets-storage", metavar="S", help="Directory storage for the hookscript"
              " snippet (as `register --storage`).")
@click.option("--dry-run", is_flag=True, help="Check everything and print what would be done.")
@json_option
@click.pass_context
def import_raw(cctx, vmid, source, storage, key, cache, no_discard, no_register, snippets_storage,
               dry_run, as_json):
    """Copy a whole disk into a new RAW LVM volume of a stopped VM and attach it.

    SOURCE_DISK is a whole block device (/dev/nvme0n1, or a /dev/disk/by-id/ link to one);
    STORAGE an lvm or lvmthin storage. The copy runs as a Proxmox task (qemu-img), its
    progress is shown as it goes. Then pvehook is registered as the VM's hookscript.
    """
    def echo(line: str) -> None:
        click.echo(line, err=as_json)

    key = key.lower()
    pve = api()
    ctx = context()
    plan = plan_import(pve, ctx, vmid, source, storage, key.lower(),
                       None if cache == "default" else cache, not no_discard,
                       not no_register, snippets_storage)
    for line in plan.lines:
        echo(line)
    for note in plan.notes:
        echo(f"note: {note}")
    if dry_run:
        echo("would run: " + " ".join(plan.pvesh_argv))
        if plan.hookscript:
            echo(f"would register the hookscript {plan.hookscript} on VM {vmid}")
        echo("dry run: nothing changed")
        plan.release()
        if as_json:
            emit_json({**plan.as_dict(), "dry_run": True})
        cctx.exit(0)
    done = run_import(pve, plan, echo)
    echo(f"VM {vmid}: {key}: {done['config']}")
    for w in done["warnings"]:
        click.echo(f"pvehook: warning: {w}", err=True)
    result = {**plan.as_dict(), "dry_run": False, **done, "registered": None}
    if plan.hookscript:
        out = register_vms(pve, ctx.root, [vmid], ctx.node, snippets_storage)
        result["registered"] = out.as_dict()
        if out.error is not None:
            out.error.args = (f"{out.error.args[0]} (the disk was imported and attached as"
                              f" {key}: {done['volume']})",)
        if not as_json:
            cctx.exit(print_outcome(out, False, "registered"))
        emit_json(result)
        if out.error is not None:
            raise out.error
        cctx.exit(0)
    if as_json:
        emit_json(result)
    cctx.exit(0)
