"""The stand-in Proxmox VE behind tests/cli/bin/pvesh and pvesm.

It does to a temporary tree (env PVEHOOK_ROOT) what the real API does to /etc/pve and the
storages, for the API paths pvehook uses, with the real messages and error shapes:

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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(os.environ["PVEHOOK_ROOT"])
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
    check_vmid(vmid)
    check_node(node)
    delete = [d for d in (params.pop("delete", "") or "").replace(";", ",").split(",") if d]
    digest = params.pop("digest", None)
    if "hookscript" in params and not VOLID_RE.match(params["hookscript"]):
        raise param_exc({"hookscript": f"invalid format - unable to parse volume ID '{params['hookscript']}'\n"})
    if not delete and not params:
        raise Die("no options specified\n")
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
    return None


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
     {"hookscript", "delete", "digest", "revert", "skiplock", "name", "description"}),
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
