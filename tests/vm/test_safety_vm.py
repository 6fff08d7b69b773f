"""Planted lock files on a real kernel: an unprivileged user against the hook (root).

One boot. A local user, mallory (useradd; privileges dropped with runuser), plants
/run/lock/pvehook before the hook's first run (on a node /run/lock is world-writable,
mode 1777): S1's lock file a link to /etc/pvehook-pwned (the old hook, root, created
that file), S2's a link to a file of hers on which she holds a flock (the old hook
waited for it, then refused the start; every start, as long as she likes). She cannot
create /run/pvehook, where the locks now are. The hook starts the VM; the link targets
are neither created nor touched.

Then the directory that is wrong: /run/pvehook handed to her (an admin's chown by
mistake), with a lock directory of hers inside. The hook refuses (exit 1), says what to
do, changes nothing; once the admin removes the directory as told, the VM starts.
"""

from __future__ import annotations

import re

from harness import Topology, run_guest

SCRIPT = r"""
set -u
HOOK=${PVEHOOK_HOOK:-/src/hooks/pvehook-hook}
export PVEHOOK_TIMEOUT_LOCK=10   # bounds a hook that would wait on her lock
mkdir -p /etc/pve/qemu-server
modprobe nvme; modprobe vfio-pci
udevadm settle
fact() { echo "$1=$2"; }
run_hook() { local n=$1; shift; "$HOOK" "$@" > /results/$n.log 2>&1; fact rc_$n $?; }
as_mallory() { runuser -u mallory -- "$@"; }
S1=$VM_BDF_S1 S2=$VM_BDF_S2
printf 'memory: 512\nhostpci0: %s\nhostpci1: %s\n' $S1 $S2 > /etc/pve/qemu-server/100.conf

chmod 1777 /run/lock            # as on a node (tmpfs, world-writable, sticky)
useradd -m mallory
fact mallory_uid "$(id -u mallory)"

# -- 1. she plants the old lock directory before the hook ever ran ----------------------
as_mallory mkdir -m 0777 /run/lock/pvehook
as_mallory touch /home/mallory/held
as_mallory ln -s /etc/pvehook-pwned /run/lock/pvehook/$S1.lock
as_mallory ln -s /home/mallory/held /run/lock/pvehook/$S2.lock
as_mallory flock /home/mallory/held sleep 600 </dev/null >/dev/null 2>&1 &  # not our stdout
HOLDER=$!
until ! flock -n /home/mallory/held true; do sleep 0.05; done   # she holds it
fact mallory_holds "$(flock -n /home/mallory/held true && echo no || echo yes)"
as_mallory mkdir /run/pvehook 2> /results/mkdir.err && fact mallory_mkdir ok || fact mallory_mkdir denied
ls -la /run/lock/pvehook > /results/planted.txt

t0=$(date +%s%N)
run_hook pre 100 pre-start
fact pre_ms $(( ($(date +%s%N) - t0) / 1000000 ))
fact pre_s1 "$(vm_driver $S1)"; fact pre_s2 "$(vm_driver $S2)"
fact pwned "$(test -e /etc/pvehook-pwned && echo created || echo absent)"
fact held_size "$(stat -c %s /home/mallory/held)"
fact held_owner "$(stat -c %U /home/mallory/held)"
fact state_dir "$(stat -c '%U %a' /run/pvehook)"
fact lock_dir "$(stat -c '%U %a' /run/pvehook/locks)"
fact lock_s1 "$(stat -c '%U %F' /run/pvehook/locks/$S1.lock)"
fact mallory_reads_locks "$(as_mallory ls /run/pvehook/locks >/dev/null 2>&1 && echo yes || echo no)"
run_hook post 100 post-stop
fact post_s1 "$(vm_driver $S1)"; fact post_s2 "$(vm_driver $S2)"

# -- 2. /run/pvehook is hers (an admin's chown by mistake) --------------------------------
chown -R mallory: /run/pvehook
as_mallory rm -rf /run/pvehook/locks
as_mallory mkdir /home/mallory/locks
as_mallory ln -s /home/mallory/locks /run/pvehook/locks
run_hook refused 100 pre-start
fact refused_s1 "$(vm_driver $S1)"; fact refused_s2 "$(vm_driver $S2)"
fact her_locks "$(ls -A /home/mallory/locks | wc -l)"
fact her_dir_owner "$(stat -c %U /run/pvehook)"

rm -rf /run/pvehook             # what the message says to do
run_hook again 100 pre-start
fact again_s1 "$(vm_driver $S1)"; fact again_s2 "$(vm_driver $S2)"
run_hook again_post 100 post-stop
fact again_post_s1 "$(vm_driver $S1)"
fact pwned_end "$(test -e /etc/pvehook-pwned && echo created || echo absent)"
kill $HOLDER 2>/dev/null
exit 0
"""


def facts(output: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^(\w+)=(.*)$", output, re.M))


def test_a_local_user_plants_the_lock_directory(vm_workdir):
    topo = Topology().isolated_nvme("S1").isolated_nvme("S2")
    res = run_guest(SCRIPT, topo, timeout=420, workdir=vm_workdir)
    print(res.output)
    print(f"boot took {res.duration:.1f} s")
    assert res.exit_code == 0, res.output
    f = facts(res.output)
    log = {n: (res.results_dir / f"{n}.log").read_text() for n in ("pre", "refused", "again")}

    # Her plant is in place, her lock held; /run/pvehook is not hers to create.
    assert f["mallory_holds"] == "yes" and f["mallory_mkdir"] == "denied"
    # 1. The hook neither waits for her lock nor follows her links; the VM starts.
    assert f["rc_pre"] == "0", log["pre"]
    assert f["pre_s1"] == f["pre_s2"] == "vfio-pci"
    assert f["pwned"] == "absent"
    assert (f["held_size"], f["held_owner"]) == ("0", "mallory")
    assert f["state_dir"] == f["lock_dir"] == "root 700"
    assert f["lock_s1"] == "root regular empty file"
    assert f["mallory_reads_locks"] == "no"
    assert f["rc_post"] == "0" and f["post_s1"] == f["post_s2"] == "nvme"
    # 2. A directory of hers: refused, with what to do; nothing moved, nothing written.
    assert f["rc_refused"] == "1", log["refused"]
    assert "/run/pvehook belongs to mallory" in log["refused"]
    assert "rm -rf /run/pvehook" in log["refused"]
    assert "Traceback" not in log["refused"]
    assert f["refused_s1"] == f["refused_s2"] == "nvme"
    assert f["her_locks"] == "0" and f["her_dir_owner"] == "mallory"
    # Removed as told: the VM starts, and stops.
    assert f["rc_again"] == "0", log["again"]
    assert f["again_s1"] == f["again_s2"] == "vfio-pci"
    assert f["rc_again_post"] == "0" and f["again_post_s1"] == "nvme"
    assert f["pwned_end"] == "absent"
