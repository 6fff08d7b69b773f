"""The stand-in Proxmox VE behind tests/cli/bin/pvesh and pvesm.

It does to a temporary tree (env PVEHOOK_ROOT; "/" when unset, as in the real-kernel
guest, whose root is a throw-away overlay with its own /etc/pve) what the real API does
to /etc/pve and the storages, for the API paths pvehook uses, with the real messages and
error shapes:

- pvesh prints uncaught errors on stderr and exits 255 (perl's die at top level;
  bin/pvesh -> PVE::CLIHandler::run_cli_handler has no eval). A PVE::Exception with a
  code prints "<code> <msg>" and one "<param>: <why>" line per error
  (pve-common src/PVE/Exception.pm stringify); a plain die prints just the message,
  e.g. "Configuration file 'nodes/pve1/qemu-server/999.conf' does not exist"
  (pve-guest-common AbstractConfig.pm load_config).
- Only root may run pvesh/pvesm ("please run as root", pve-common RESTEnvironment.pm
  setup_default_cli_env); env PVESH_FAKE_NONROOT=1 plays a non-root caller.
- PUT /nodes/{node}/qemu/{vmid}/config runs on {node} (proxyto): hookscript is checked
  with GuestHelpers::check_hookscript (vtype snippets, -f, -x) before the config is
  loaded; then the lock check, then the write (qemu-server src/PVE/API2/Qemu.pm).
- Each node has its own copy of a non-shared directory storage: node N's files live under
  <root>/fakenodes/N/<path>, the local node's (/etc/pve/local) under <root>/<path>;
  shared storages (nfs, cifs, cephfs, `shared 1`) are the same files everywhere.
- env PVESH_LOG=<file>: every call's argv is appended as one JSON line.
- Disks (`scsi0=...` etc. on POST/PUT .../config) as qemu-server's create_disks: a plain
  volume is set as given; `<storage>:0,import-from=<abs path>` (any other form: "'import-from'
  requires special syntax ...") allocates vm-<vmid>-disk-<lowest free N> on an lvm/lvmthin
  storage, copies the source printing qemu-server's "transferred X of Y (p%)" lines (a
  device path of the tree: <root>/<path>), frees the volume when the copy fails, and sets
  `<disk>: <storage>:<name>,<options sorted>,size=<format_size>`. The LVs are files
  <root>/dev/<vg>/<name>; env FAKEPVE_LVM=real makes real LVs instead (lvcreate; for the
  real-kernel guest). env FAKEPVE_IMPORT_FAIL=<percent> fails the copy there;
  env FAKEPVE_DURING_COPY runs a shell command once mid-copy (its output in the task log).
- POST .../config runs in a worker task (RESTEnvironment fork_worker): as under the real
  pvesh (a CLI environment) in the foreground, its output on stdout as it happens, a task
  error on stderr, the UPID printed last and exit 0 either way; env FAKEPVE_TASK_ASYNC=1
  plays a daemon/proxied call instead (the UPID at once, the task in the background). PUT
  does the same work without a task (update_vm_api sync). Tasks: a log per UPID under
  <root>/var/log/pve/tasks (GET /nodes/{node}/tasks/{upid}/log: [{"n", "t"}], start/limit as
  PVE::Tools::dump_logfile; /status: {"status": "running"|"stopped", "exitstatus": ...}).
- GET /nodes/{node}/qemu/{vmid}/status/current: "running" while <root>/run/qemu-server/
  <vmid>.pid exists (as /cluster/resources), with `lock` from the config.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(os.environ.get("PVEHOOK_ROOT", "/"))  # "/" in the real-kernel guest
PVE = ROOT / "etc/pve"
DIR_TYPES = {"dir", "nfs", "cifs", "cephfs", "btrfs", "glusterfs"}
SHARED_TYPES = {"nfs", "cifs", "cephfs", "glusterfs"}
# plugindata content of each plugin (pve-storage src/PVE/Storage/*Plugin.pm)
CONTENT = {
    "dir": {"images", "rootdir", "vztmpl", "iso", "backup", "snippets", "import", "none"},
    "nfs": {"images", "rootdir", "vztmpl", "iso", "backup", "snippets", "import"},
    "cifs": {"images", "rootdir", "vztmpl", "iso", "backup", "snippets", "import"},
    "cephfs": {"vztmpl", "iso", "backup", "snippets", "import"},
    "btrfs": {"images", "rootdir", "vztmpl", "iso", "backup", "snippets", "import", "none"},
    "lvm": {"images", "rootdir", "none"},
    "lvmthin": {"images", "rootdir"},
    "zfspool": {"images", "rootdir"},
}
VOLID_RE = re.compile(r"^([a-z][a-z0-9\-_.]*[a-z0-9]):(.+)$", re.I)
# PVE::QemuServer::Drive: valid drive names and NEW_DISK_RE
DISK_KEYS = ({f"ide{i}" for i in range(4)} | {f"scsi{i}" for i in range(31)}
             | {f"virtio{i}" for i in range(16)} | {f"sata{i}" for i in range(6)}
             | {"efidisk0", "tpmstate0"})
NEW_DISK_RE = re.compile(r"^(([^/:\s]+):)?(\d+(\.\d+)?)$")
TASKS = ROOT / "var/log/pve/tasks"


class Die(Exception):
    """perl's die: the text goes to stderr as is."""


def param_exc(errors: dict[str, str], usage: str = "") -> Die:
    text = "400 Parameter verification failed.\n" + "".join(
        f"{k}: {v if v.endswith(chr(10)) else v + chr(10)}" for k, v in errors.items())
    return Die(text + usage)


def local_node() -> str:
    return os.path.basename(os.readlink(PVE / "local"))


def nodes() -> list[str]:
    return sorted(p.name for p in (PVE / "nodes").iterdir() if p.is_dir())


# -- storage.cfg ---------------------------------------------------------------------------

def read_storage() -> dict[str, dict]:
    path = PVE / "storage.cfg"
    text = path.read_text() if path.exists() else ""
    out: dict[str, dict] = {}
    cur = None
    for line in text.split("\n"):
        if line.strip().startswith("#"):
            continue
        if not line.strip():
            cur = None
            continue
        m = re.match(r"^(\S+):\s*(\S+)\s*$", line)
        if m and cur is None:
            cur = out[m[2]] = {"type": m[1], "storage": m[2]}
        elif cur is not None and (m := re.match(r"^\s+(\S+)(?:\s+(.*\S))?\s*$", line)):
            cur[m[1]] = m[2] if m[2] is not None else "1"
    if "local" not in out:
        out["local"] = {"type": "dir", "storage": "local", "path": "/var/lib/vz",
                        "content": "backup,images,iso,rootdir,snippets,vztmpl"}
    return out


def write_storage_option(sid: str, key: str, value: str) -> None:
    path = PVE / "storage.cfg"
    lines = path.read_text().split("\n")
    out, in_sec, done = [], False, False
    for line in lines:
        m = re.match(r"^(\S+):\s*(\S+)\s*$", line)
        if m:
            in_sec = m[2] == sid
        elif in_sec and not line.strip():
            if not done:
                out.append(f"\t{key} {value}")
                done = True
            in_sec = False
        elif in_sec and re.match(rf"^\s+{re.escape(key)}(\s|$)", line):
            line, done = f"\t{key} {value}", True
        out.append(line)
    if in_sec and not done:
        while out and out[-1] == "":
            out.pop()
        out += [f"\t{key} {value}", ""]
    path.write_text("\n".join(out))


def storage_cfg(sid: str) -> dict:
    s = read_storage().get(sid)
    if s is None:
        raise Die(f"storage '{sid}' does not exist\n")
    return s


def storage_dir(s: dict, node: str) -> Path:
    base = s.get("path") or f"/mnt/pve/{s['storage']}"
    shared = s["type"] in SHARED_TYPES or s.get("shared") == "1"
    top = ROOT if shared or node == local_node() else ROOT / "fakenodes" / node
    return top / base.lstrip("/")


def volume_path(volid: str, node: str) -> tuple[Path, str]:
    """PVE::Storage::path: (path, vtype)."""
    m = VOLID_RE.match(volid)
    if not m:
        raise Die(f"unable to parse volume ID '{volid}'\n")
    s = storage_cfg(m[1])
    volname = m[2]
    if s["type"] not in DIR_TYPES:
        kind = {"lvm": "lvm", "lvmthin": "lvm", "zfspool": "zfs"}.get(s["type"], s["type"])
        raise Die(f"unable to parse {kind} volume name '{volname}'\n")
    vm = re.match(r"^(snippets|iso|vztmpl|import)/([^/]+)$", volname)
    if not vm:
        raise Die(f"unable to parse directory volume name '{volname}'\n")
    sub = vm[1]
    for pair in (s.get("content-dirs") or "").split(","):
        k, _, v = pair.partition("=")
        if k == vm[1] and v:
            sub = v.strip("/")
    return storage_dir(s, node) / sub / vm[2], vm[1]


def storage_enabled(s: dict, node: str) -> None:
    if s.get("disable") == "1":
        raise Die(f"storage '{s['storage']}' is disabled\n")
    if s.get("nodes") and node not in s["nodes"].split(","):
        raise Die(f"storage '{s['storage']}' is not available on node '{node}'\n")


# -- VM configs ------------------------------------------------------------------------------

def conf_path(node: str, vmid: str) -> tuple[Path, str]:
    rel = f"nodes/{node}/qemu-server/{vmid}.conf"
    return PVE / rel, rel


def load_config(node: str, vmid: str) -> tuple[Path, str, dict]:
    path, rel = conf_path(node, vmid)
    if not path.exists():
        raise Die(f"Configuration file '{rel}' does not exist\n")
    text = path.read_text()
    conf = {}
    for line in text.split("\n"):
        if line.startswith("["):
            break
        m = re.match(r"^([a-z][a-z_\-]*\d*):\s*(.+?)\s*$", line)
        if m:
            conf[m[1]] = m[2]
    conf["digest"] = hashlib.sha1(text.encode()).hexdigest()
    return path, text, conf


def write_main_option(path: Path, text: str, key: str, value: str | None) -> None:
    lines = text.split("\n")
    end = next((i for i, line in enumerate(lines) if line.startswith("[")), len(lines))
    main = [line for line in lines[:end] if not re.match(rf"^{key}:", line)]
    while main and main[-1] == "":
        main.pop()
    if value is not None:
        main.append(f"{key}: {value}")
    rest = lines[end:]
    new = "\n".join(main) + "\n" + ("\n" + "\n".join(rest) if rest else "")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new)
    tmp.replace(path)


# -- API handlers -------------------------------------------------------------------------

def check_node(node: str) -> None:
    if node not in nodes():
        raise Die(f"hostname lookup '{node}' failed - failed to get address info for: {node}:"
                  " Name or service not known\n")


def check_vmid(vmid: str) -> None:
    if not re.fullmatch(r"\d+", vmid) or not 100 <= int(vmid) <= 999999999:
        raise param_exc({"vmid": f"type check ('integer') failed - got '{vmid}'"})


def get_resources(params, node=None):
    out = []
    for n in nodes():
        for kind, sub in (("qemu", "qemu-server"), ("lxc", "lxc")):
            d = PVE / "nodes" / n / sub
            if not d.is_dir():
                continue
            for f in sorted(d.glob("*.conf")):
                conf = load_config(n, f.stem)[2] if kind == "qemu" else {}
                pid = ROOT / "run/qemu-server" / f"{f.stem}.pid"
                out.append({"id": f"{kind}/{f.stem}", "type": kind, "vmid": int(f.stem),
                            "node": n, "name": conf.get("name", f"vm{f.stem}"),
                            "status": "running" if n == local_node() and pid.exists() else "stopped",
                            "template": int(conf.get("template", 0))})
    if params.get("type") not in (None, "vm"):
        raise param_exc({"type": f"value '{params['type']}' does not have a value in the enumeration 'vm, storage, node, sdn'"})
    return out


def get_nodes(params):
    return [{"node": n, "status": "online", "type": "node", "id": f"node/{n}"} for n in nodes()]


def get_config(params, node, vmid):
    check_vmid(vmid)
    check_node(node)
    return load_config(node, vmid)[2]


def put_config(params, node, vmid):
    return update_config(params, node, vmid, in_task=False)


def create_config(params, node, vmid):
    """POST: the same as PUT, in a worker task; returns the UPID."""
    params.pop("background_delay", None)
    return update_config(params, node, vmid, in_task=True)


def update_config(params, node, vmid, in_task):
    check_vmid(vmid)
    check_node(node)
    delete = [d for d in (params.pop("delete", "") or "").replace(";", ",").split(",") if d]
    digest = params.pop("digest", None)
    if "hookscript" in params and not VOLID_RE.match(params["hookscript"]):
        raise param_exc({"hookscript": f"invalid format - unable to parse volume ID '{params['hookscript']}'\n"})
    if not delete and not params:
        raise Die("no options specified\n")
    disks = {k: params[k] for k in sorted(params) if k in DISK_KEYS}
    for key, value in disks.items():
        check_disk(key, value)
    if "hookscript" in params:  # GuestHelpers::check_hookscript, on the VM's node
        volid = params["hookscript"]
        try:
            path, vtype = volume_path(volid, node)
            if vtype != "snippets":
                raise Die(f"'{volid}' is not in the snippets directory\n")
            if not path.is_file():
                raise Die(f"script '{volid}' does not exist\n")
            if not os.access(path, os.X_OK):
                raise Die(f"script '{volid}' is not executable\n")
        except Die as e:
            raise param_exc({"hookscript": str(e)}) from None
    path, text, conf = load_config(node, vmid)
    if digest and digest != conf["digest"]:
        raise Die("checksum mismatch (file change by other user?)\n")
    if conf.get("lock"):
        raise Die(f"VM is locked ({conf['lock']})\n")
    for key in delete:
        text_now = path.read_text()
        write_main_option(path, text_now, key, None)
    if "hookscript" in params:
        write_main_option(path, path.read_text(), "hookscript", params["hookscript"])
    for key, value in disks.items():
        if "import-from" not in value:
            write_main_option(path, path.read_text(), key, value)
    imports = {k: v for k, v in disks.items() if "import-from" in v}

    def work(out):
        for k, v in imports.items():
            import_disk(node, vmid, k, v, out)

    return run_task(node, vmid, work) if in_task else work(
        lambda line: sys.stdout.write(line + "\n"))


# -- disks (qemu-server create_disks, ImportDisk::do_import, QemuImage::convert) --------------

def parse_drive(value: str) -> tuple[str, dict[str, str]]:
    parts = value.split(",")
    opts = {}
    for p in parts[1:]:
        k, _, v = p.partition("=")
        opts[k] = v
    return parts[0], opts


def check_disk(key: str, value: str) -> None:
    """check_drive_param + check_storage_access, before anything is written."""
    file, opts = parse_drive(value)
    if "import-from" in opts:
        m = NEW_DISK_RE.match(file)
        if not m or float(m[3]) != 0:
            raise param_exc({key: "'import-from' requires special syntax - use <storage ID>:0,"
                                  "import-from=<source>"})
        s = storage_cfg(m[2])
        if "images" not in (s.get("content") or "images").split(","):
            raise param_exc({"storage": f"storage '{m[2]}' does not support vm images"})
        src = opts["import-from"]
        if not src.startswith("/"):
            raise Die("stand-in pvesh imports from absolute paths only\n")
        p = ROOT / src.lstrip("/")
        if not (p.is_file() or p.is_block_device()):
            raise Die(f"can't find file '{src}'\n")


def format_size(size: int) -> str:
    """PVE::JSONSchema::format_size."""
    kb, rest = divmod(size, 1024)
    if rest:
        return str(size)
    mb, rest = divmod(kb, 1024)
    if rest:
        return f"{kb}K"
    gb, rest = divmod(mb, 1024)
    if rest:
        return f"{mb}M"
    tb, rest = divmod(gb, 1024)
    return f"{gb}G" if rest else f"{tb}T"


def render_bytes(value: float) -> str:
    """PVE::Format::render_bytes($value, 1)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    i = 0
    while value > 1023 and i < len(units) - 1:
        value /= 1024
        i += 1
    return f"{value:.1f} {units[i]}"


def real_lvm() -> bool:
    return os.environ.get("FAKEPVE_LVM") == "real"


def lvm(*args: str) -> str:
    p = subprocess.run(["lvm", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise Die(f"lvm {args[0]} failed: {p.stderr.strip()}\n")
    return p.stdout


def lv_names(vg: str) -> set[str]:
    if real_lvm():
        return set(lvm("lvs", "--noheadings", "-o", "lv_name", vg).split())
    d = ROOT / "dev" / vg
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


def size_of(path: Path) -> int:
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def import_disk(node: str, vmid: str, key: str, value: str, out) -> None:
    file, opts = parse_drive(value)
    sid = NEW_DISK_RE.match(file)[2]
    s = storage_cfg(sid)
    if s["type"] not in ("lvm", "lvmthin"):
        raise Die(f"stand-in pvesh imports into lvm/lvmthin storages only, not {s['type']}\n")
    src_name = opts.pop("import-from")
    opts.pop("format", None)  # no longer needed
    src = ROOT / src_name.lstrip("/")
    size = size_of(src)
    if not size:
        raise Die(f"could not get file size of {src_name}\n")
    vg = s["vgname"]
    names = lv_names(vg)
    name = next(f"vm-{vmid}-disk-{n}" for n in range(1000) if f"vm-{vmid}-disk-{n}" not in names)
    if real_lvm():
        kib = (size + 1023) // 1024
        if s["type"] == "lvmthin":
            lvm("lvcreate", "--type", "thin", "--virtualsize", f"{kib}k", "--name", name,
                "--thinpool", f"{vg}/{s['thinpool']}")
        else:
            lvm("lvcreate", "--size", f"{kib}k", "--name", name, "--setautoactivation", "n",
                "--wipesignatures", "y", "-y", vg)
        dst = Path(f"/dev/{vg}/{name}")
    else:
        dst = ROOT / "dev" / vg / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "wb") as f:
            f.truncate(size)
    out(f'  Logical volume "{name}" created.')
    fail_at = os.environ.get("FAKEPVE_IMPORT_FAIL")
    during = os.environ.get("FAKEPVE_DURING_COPY")  # a shell command run once mid-copy
    try:
        copied, shown = 0, -1.0
        with open(src, "rb") as fi, open(dst, "r+b") as fo:
            while True:
                pct = round(100.0 * copied / size, 2)
                if int(pct) != int(shown) or pct == 100.0 and shown != 100.0:
                    out(f"transferred {render_bytes(int(size * pct / 100))} of"
                        f" {render_bytes(size)} ({pct:.2f}%)")
                    shown = pct
                if fail_at is not None and pct >= float(fail_at):
                    raise Die("copy failed: command '/usr/bin/qemu-img convert -p -n -O raw"
                              f" {src_name} zeroinit:{dst}' failed: exit code 1\n")
                if during and copied:
                    r = subprocess.run(during, shell=True, capture_output=True, text=True)
                    for line in (r.stdout + r.stderr).splitlines():
                        out(line)
                    during = None
                buf = fi.read(min(1 << 20, size - copied))
                if not buf:
                    break
                fo.write(buf)
                copied += len(buf)
            fo.flush()
            os.fsync(fo.fileno())
        if real_lvm():
            lvm("lvchange", "-an", f"{vg}/{name}")
    except BaseException:
        if real_lvm():
            lvm("lvremove", "-f", f"{vg}/{name}")
        else:
            dst.unlink()
        raise
    drive = ",".join([f"{sid}:{name}", *(f"{k}={v}" if v else k for k, v in
                                          sorted({**opts, "size": format_size(size)}.items()))])
    path, text, _ = load_config(node, vmid)
    write_main_option(path, text, key, drive)
    out(f"{key}: successfully created disk '{drive}'")


# -- tasks (RESTEnvironment fork_worker, PVE::Tools::dump_logfile, API2/Tasks.pm) -----------

def task_file(upid: str) -> Path:
    # PVE::UPID::decode
    if not re.fullmatch(r"UPID:[^/:]+:[0-9A-F]{8}:[0-9A-F]{8,9}:[0-9A-F]{8}:"
                        r"[^:/]*:[^:/]*:[^:/]*:", upid):
        raise param_exc({"upid": "unable to parse worker upid"})
    return TASKS / upid


def run_task(node: str, vmid: str, work):
    """fork_worker: the UPID (async), or the output printed and the UPID (cli: foreground)."""
    TASKS.mkdir(parents=True, exist_ok=True)
    upid = (f"UPID:{node}:{os.getpid():08X}:{int(time.monotonic() * 100) & 0xFFFFFFFF:08X}:"
            f"{int(time.time()):08X}:qmconfig:{vmid}:root@pam:")
    log = task_file(upid)
    log.write_text("")
    background = os.environ.get("FAKEPVE_TASK_ASYNC") == "1"
    if background and os.fork() != 0:
        return upid
    if background:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)

    def out(line: str) -> None:
        with open(log, "a") as f:
            f.write(line + "\n")
        if not background:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        if os.environ.get("FAKEPVE_TASK_DELAY"):
            time.sleep(float(os.environ["FAKEPVE_TASK_DELAY"]))

    try:
        work(out)
        status = "OK"
    except Die as e:
        status = " ".join(str(e).split())
        if not background:
            sys.stderr.write(status + "\n")
        with open(log, "a") as f:
            f.write(f"\nTASK ERROR: {status}\n")
    else:
        with open(log, "a") as f:
            f.write("TASK OK\n")
    log.with_name(log.name + ".status").write_text(status)
    if background:
        os._exit(0)
    return upid


def get_task_status(params, node, upid):
    check_node(node)
    log = task_file(upid)
    if not log.exists():
        raise param_exc({"upid": "no such task"})
    f = upid.split(":")
    st = log.with_name(log.name + ".status")
    out = {"upid": upid, "node": f[1], "pid": int(f[2], 16), "pstart": int(f[3], 16),
           "starttime": int(f[4], 16), "type": f[5], "id": f[6], "user": f[7],
           "status": "stopped" if st.exists() else "running"}
    if st.exists():
        out["exitstatus"] = st.read_text()
    return out


def get_task_log(params, node, upid):
    check_node(node)
    log = task_file(upid)
    start, limit = int(params.get("start", 0)), int(params.get("limit", 50))
    lines = log.read_text().splitlines() if log.exists() else []
    sel = lines[start:] if limit == 0 else lines[start:start + limit]
    out = [{"n": start + i + 1, "t": t} for i, t in enumerate(sel)]
    if not lines:
        out = [{"n": 1, "t": "no content"}]
    return out


def get_vm_status(params, node, vmid):
    check_vmid(vmid)
    check_node(node)
    conf = load_config(node, vmid)[2]
    running = node == local_node() and (ROOT / "run/qemu-server" / f"{vmid}.pid").exists()
    out = {"vmid": int(vmid), "status": "running" if running else "stopped",
           "name": conf.get("name", f"VM {vmid}"), "cpus": 1, "maxmem": 2 << 30,
           "ha": {"managed": 0}}
    if running:
        out["qmpstatus"] = "running"
    if conf.get("lock"):
        out["lock"] = conf["lock"]
    return out


def get_storage_index(params):
    out = []
    for sid, s in sorted(read_storage().items()):
        if params.get("type") and s["type"] != params["type"]:
            continue
        out.append({**s, "digest": "0" * 40})
    return out


def get_storage(params, sid):
    return {**storage_cfg(sid), "digest": "0" * 40}


def put_storage(params, sid):
    s = storage_cfg(sid)
    params.pop("digest", None)
    if "content" in params:
        valid = CONTENT.get(s["type"], set())
        keep = []
        for c in [c for c in params["content"].split(",") if c]:
            if c not in valid:
                sys.stderr.write(f"storage does not support content type '{c}'\n")  # a warn
            else:
                keep.append(c)
        if not keep:
            raise Die("storage does not support content type 'none'\n")
        write_storage_option(sid, "content", ",".join(sorted(set(keep))))
    return {"storage": sid, "type": s["type"]}


def get_content(params, node, sid):
    check_node(node)
    s = storage_cfg(sid)
    storage_enabled(s, node)
    kinds = set(s.get("content", "").split(","))
    want = params.get("content")
    out = []
    if "snippets" in kinds and want in (None, "snippets") and s["type"] in DIR_TYPES:
        d = volume_path(f"{sid}:snippets/x", node)[0].parent
        for f in sorted(d.glob("*")) if d.is_dir() else []:
            if f.is_file():
                out.append({"volid": f"{sid}:snippets/{f.name}", "format": "snippet",
                            "content": "snippets", "size": f.stat().st_size,
                            "ctime": int(f.stat().st_mtime)})
    return out


HANDLERS = [
    ("get", r"/cluster/resources", get_resources, {"type"}),
    ("get", r"/nodes", get_nodes, set()),
    ("get", r"/nodes/([^/]+)/qemu/([^/]+)/config", get_config, {"current", "snapshot"}),
    ("set", r"/nodes/([^/]+)/qemu/([^/]+)/config", put_config,
     {"hookscript", "delete", "digest", "revert", "skiplock", "name", "description", *DISK_KEYS}),
    ("create", r"/nodes/([^/]+)/qemu/([^/]+)/config", create_config,
     {"hookscript", "delete", "digest", "revert", "skiplock", "name", "description",
      "background_delay", *DISK_KEYS}),
    ("get", r"/nodes/([^/]+)/qemu/([^/]+)/status/current", get_vm_status, set()),
    ("get", r"/nodes/([^/]+)/tasks/([^/]+)/status", get_task_status, set()),
    ("get", r"/nodes/([^/]+)/tasks/([^/]+)/log", get_task_log, {"start", "limit"}),
    ("get", r"/storage", get_storage_index, {"type"}),
    ("get", r"/storage/([^/]+)", get_storage, set()),
    ("set", r"/storage/([^/]+)", put_storage, {"content", "digest", "delete", "disable", "nodes"}),
    ("get", r"/nodes/([^/]+)/storage/([^/]+)/content", get_content,
     {"content", "vmid"}),
]


def parse_args(args: list[str]) -> tuple[dict, dict]:
    params, opts = {}, {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("-") or i + 1 >= len(args):
            raise Die(f"400 Parameter verification failed.\n{a}: unexpected argument\n")
        key = a.lstrip("-")
        if key in ("output-format", "quiet", "noproxy", "human-readable", "noborder", "noheader"):
            opts[key] = args[i + 1]
        else:
            params[key] = args[i + 1]
        i += 2
    return params, opts


def pvesh(argv: list[str]) -> int:
    if len(argv) < 2:
        raise Die("USAGE: pvesh <COMMAND> [ARGS] [OPTIONS]\n")
    cmd, path, rest = argv[0], "/" + argv[1].strip("/"), argv[2:]
    if cmd not in ("get", "set", "create", "delete", "ls", "usage"):
        raise Die(f"unknown command 'pvesh {cmd}'\n")
    params, opts = parse_args(rest)
    for method, pattern, func, allowed in HANDLERS:
        m = re.fullmatch(pattern, path)
        if not m:
            continue
        if method != cmd:
            continue
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise param_exc({k: "property is not defined in schema and the schema does not"
                                " allow additional properties" for k in unknown},
                            f"USAGE: pvesh {cmd} {path} [OPTIONS]\n")
        result = func(params, *m.groups())
        if result is not None:
            if opts.get("output-format", "text").startswith("json"):
                sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
            else:
                sys.stdout.write(f"{result}\n")
        return 0
    raise Die(f"no '{cmd}' handler for '{path}'\n")


def pvesm(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "path":
        raise Die("stand-in pvesm knows only `pvesm path <volume>`\n")
    if not VOLID_RE.match(argv[1]):
        raise param_exc({"volume": f"invalid format - unable to parse volume ID '{argv[1]}'\n"})
    path, _ = volume_path(argv[1], local_node())
    sys.stdout.write(f"{path}\n")
    return 0


def run(tool) -> None:
    if os.environ.get("PVESH_LOG"):
        with open(os.environ["PVESH_LOG"], "a") as f:
            f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\n")
    try:
        if os.environ.get("PVESH_FAKE_NONROOT") == "1":
            raise Die("please run as root\n")
        sys.exit(tool(sys.argv[1:]))
    except Die as e:
        sys.stderr.write(str(e))
        sys.exit(255)
