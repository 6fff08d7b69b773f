"""The installed Debian package on Debian trixie (the base of Proxmox VE 9), one boot.

In the harness's guest (a tmpfs overlay over the cached trixie tree, no network):
1. `apt-get install /results/pvehook_<v>_all.deb` in a guest without a network card: it
   installs offline, its dependencies are all already in the trixie tree (apt fetches
   nothing: `--no-download` cannot be used, apt then fails on local .deb files);
2. debian/tests/smoke, unit-cli, maintscripts (the autopkgtests) run against it: version,
   paths, man page, completion, the hook and the snippet; tests/cli with trixie's Python
   and proxmoxer (what the bookworm build has to skip); removal refused
   while a VM uses the hook, purge cleaning up;
3. reinstall, then an upgrade (the same package repacked as <v>+up1) while a VM is
   registered: no refusal, and the registered snippet still runs the hook afterwards;
4. the lifecycle scenario of tests/vm/test_hook_vm.py (assign, nested QEMU through VFIO,
   twins, shared group, mapping=, give back) with the installed hook
   /usr/share/pvehook/pvehook-hook, PYTHONPATH unset (the guest sets PYTHONPATH=/src for
   the source-tree tests), so pvehook comes from /usr/lib/python3/dist-packages.
"""

from __future__ import annotations

import re

import harness
import test_hook_vm

HOOK_PATH = "/usr/share/pvehook/pvehook-hook"

# The guest has no network card: an install that needs a download fails.
# Runs before tests/vm's PRELUDE + LIFECYCLE, in the same shell: `fact` lines are parsed
# with the scenario's own. No `exit`: the scenario follows.
STAGE = r"""
unset PYTHONPATH
cd /
fact() { echo "$1=$2"; }
DEB=/results/@DEB@
fact deb_version "$(dpkg-deb -f $DEB Version)"
fact python_version "$(python3 -c 'import sys; print(sys.version.split()[0])')"
fact proxmoxer_version "$(dpkg-query -W -f '${Version}' python3-proxmoxer)"
inst() { apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 "$@"; }
t0=$(date +%s)
inst $DEB > /results/install.log 2>&1; fact rc_install $?
fact install_seconds $(( $(date +%s) - t0 ))
fact installed_version "$(dpkg-query -W -f '${Version}' pvehook)"
fact version_out "$(pvehook --version)"
fact module "$(python3 -c 'import pvehook; print(pvehook.__file__)')"
fact hook_path "$(python3 -c 'from pvehook.paths import HOOK_PATH; print(HOOK_PATH)')"
fact hook_owner "$(dpkg -S @HOOK@ | cut -d: -f1)"
dpkg -L pvehook > /results/files.txt

# The autopkgtests, from the source tree (unit-cli copies tests/ out of it). unit-cli runs
# the CLI tests that talk to the stand-in pvesh through proxmoxer's local backend, which
# the bookworm build skips (bookworm's proxmoxer 1.2 has none); tests/unit and the rest
# of tests/cli ran at build time, and all of them take minutes under TCG.
for t in smoke unit-cli maintscripts; do
    t0=$(date +%s)
    args=
    [ $t = unit-cli ] && args="tests/cli/test_register.py tests/cli/test_api.py"
    (cd /src && AUTOPKGTEST_TMP=$(mktemp -d) debian/tests/$t $args) > /results/ap_$t.log 2>&1
    fact rc_ap_${t//-/_} $?
    fact ap_${t//-/_}_seconds $(( $(date +%s) - t0 ))
done
fact after_maintscripts "$(dpkg-query -W -f '${db:Status-Abbrev}' pvehook 2>/dev/null)"

# Reinstall after the purge, register VM 900 as `pvehook register` does, upgrade.
inst $DEB > /results/reinstall.log 2>&1; fact rc_reinstall $?
mkdir -p /etc/pve/qemu-server /var/lib/vz/snippets
python3 -c 'from pvehook.cli.configs import SNIPPET_BODY; print(SNIPPET_BODY, end="")' > /var/lib/vz/snippets/pvehook-hook
chmod 755 /var/lib/vz/snippets/pvehook-hook
printf 'memory: 512\nhookscript: local:snippets/pvehook-hook\n' > /etc/pve/qemu-server/900.conf
rm -rf /tmp/up && dpkg-deb -R $DEB /tmp/up
sed -i "s/^Version: .*/&+up1/" /tmp/up/DEBIAN/control
dpkg-deb -b /tmp/up /tmp/pvehook_up1_all.deb > /dev/null
inst /tmp/pvehook_up1_all.deb > /results/upgrade.log 2>&1; fact rc_upgrade $?
fact upgraded_version "$(dpkg-query -W -f '${Version}' pvehook)"
/var/lib/vz/snippets/pvehook-hook 900 pre-start > /results/snippet_pre.log 2>&1; fact rc_snippet_pre $?
/var/lib/vz/snippets/pvehook-hook 900 post-stop > /results/snippet_post.log 2>&1; fact rc_snippet_post $?
rm -rf /etc/pve /var/lib/vz/snippets /run/pvehook /run/lock/pvehook

# Proof for the scenario below: this shell runs the installed code.
fact stage_pythonpath "${PYTHONPATH:-unset}"
fact stage_module "$(python3 -c 'import pvehook; print(pvehook.__file__)')"
"""


def facts(output: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^(\w+)=(.*)$", output, re.M))


def test_installed_package_on_trixie(deb, vm_workdir, monkeypatch):
    booted = []

    def run_installed(script, topology=None, **kw):
        kw["files"] = {**(kw.get("files") or {}), deb.name: deb.read_bytes()}
        kw["timeout"] = max(kw.get("timeout", 0), 1200)
        stage = STAGE.replace("@DEB@", deb.name).replace("@HOOK@", HOOK_PATH)
        res = harness.run_guest(stage + script, topology, **kw)
        booted.append(res)
        return res

    monkeypatch.setenv("PVEHOOK_GUEST_HOOK", HOOK_PATH)
    monkeypatch.setattr(test_hook_vm, "run_guest", run_installed)
    # The scenario and its assertions, unchanged, on the installed hook.
    test_hook_vm.test_lifecycle_twins_shared_group_mapping(vm_workdir)

    (res,) = booted
    f = facts(res.output)
    r = res.results_dir

    def show(name):
        p = r / name
        return p.read_text(errors="replace") if p.exists() else f"({name} missing)"

    print({k: v for k, v in f.items() if k.endswith("_seconds") or k.endswith("version")})
    version = f["deb_version"]
    assert f["rc_install"] == "0", show("install.log")
    assert "newly installed" in show("install.log")
    assert not re.search(r"^Get:\S* (https?|ftp):", show("install.log"), re.M), show("install.log")
    assert f["installed_version"] == version
    assert f["version_out"] == f"pvehook {version}"
    assert f["module"] == "/usr/lib/python3/dist-packages/pvehook/__init__.py"
    assert f["hook_path"] == HOOK_PATH and f["hook_owner"] == "pvehook"
    files = show("files.txt").split()
    for path in ("/usr/bin/pvehook", HOOK_PATH, "/usr/share/man/man1/pvehook.1.gz",
                 "/usr/share/bash-completion/completions/pvehook",
                 "/usr/lib/python3/dist-packages/pvehook/hook.py"):
        assert path in files, files
    # Nothing inside Proxmox storages (or anywhere but /usr).
    assert all(p == "/." or p.startswith("/usr") for p in files), files

    assert f["rc_ap_smoke"] == "0", show("ap_smoke.log")
    assert "smoke: all passed" in show("ap_smoke.log")
    out = show("ap_unit_cli.log") if (r / "ap_unit_cli.log").exists() else show("ap_unit-cli.log")
    assert f["rc_ap_unit_cli"] == "0", out
    assert re.search(r"\d+ passed", out) and " failed" not in out, out
    assert "skipped" not in out or "proxmoxer" not in out, out  # trixie: nothing skipped for it
    assert f["rc_ap_maintscripts"] == "0", show("ap_maintscripts.log")
    assert f["after_maintscripts"] in ("", "un "), f["after_maintscripts"]

    assert f["rc_reinstall"] == "0", show("reinstall.log")
    assert f["rc_upgrade"] == "0", show("upgrade.log")
    assert f["upgraded_version"] == version + "+up1"
    assert f["rc_snippet_pre"] == "0", show("snippet_pre.log")
    assert f["rc_snippet_post"] == "0", show("snippet_post.log")

    assert f["stage_pythonpath"] == "unset"
    assert f["stage_module"] == "/usr/lib/python3/dist-packages/pvehook/__init__.py"
