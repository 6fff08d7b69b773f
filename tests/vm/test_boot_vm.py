"""The guest's storage across a node's reboot, on the real kernel (issue 11, item 1).

Three boots of the same disk images (kept in tmp via `image=`) and one /state share:

1. the node's first life: the host's VG `pve` on a virtio disk; on NVMe G1 (VM 100,
   onboot, the default way) the guest's own VG also named `pve`, a VG `guestvg` and an
   md RAID1; on NVMe R1 (VM 101) a VG `rvg`. pre-start of VM 100 finds guestvg active
   and md0 assembled (created by the host, as an activation at boot would leave them):
   refused while an LV is mounted, then deactivated/stopped by the safety net; post-stop
   gives G1 back with nothing activated. `pvehook reserve 101` moves R1 to vfio-pci.
2. the node's reboot: the package's files put in place before udevd starts (where the
   .deb installs them), /var/lib/pvehook and /etc/pve back from /state; udev loads nvme.
3. the same, with nvme loaded before udevd starts (as from the initramfs);
4. the same, with nvme loaded before udevd without pvehook's modprobe `install` line (as
   a kernel with nvme built in): nvme has R1 first, udev's rule moves it to vfio-pci.

After each reboot: no guest VG active and no md array, the host's own `pve` active,
R1 on vfio-pci and its namespaces never seen (kernel uevents from before udevd on,
dmesg; in boot 4 seen, but rvg never mapped), VM 100 starts and stops, VM 101 too with R1 staying on vfio-pci, and the
images of G1 and R1 byte for byte the same before and after the boot, start and stop.
"""

from __future__ import annotations

import hashlib
import re

from harness import Topology, run_guest

COMMON = r"""
set -u
fact() { echo "$1=$2"; }
HOOK=/src/hooks/pvehook-hook
run_hook() { local n=$1; shift; "$HOOK" "$@" > /results/$n.log 2>&1; fact rc_$n $?; }
pvehook() { python3 -m pvehook.cli "$@"; }
G1=$VM_BDF_G1 R1=$VM_BDF_R1 H=/dev/disk/by-id/virtio-HOSTDISK
# every LV: "lv <vg_uuid> <vg_name> <lv_name> <active|->"
lvfacts() { lvs --noheadings -o vg_uuid,vg_name,lv_name,lv_active 2>/dev/null |
            awk '{print "lv", $1, $2, $3, ($4 == "" ? "-" : $4)}'; }
"""

FIRST = COMMON + r"""
modprobe dm_mod; modprobe raid1; modprobe ext4; modprobe nvme; udevadm settle
G=$(vm_nvme_disk G1); R=$(vm_nvme_disk R1)
printf 'label: gpt\n,64M\n,64M\n,48M\n,48M\n' | sfdisk -q $G; udevadm settle
# The guest's VGs, made as the guest's installer would (the guest's `pve` first: LVM
# refuses to create a second VG of one name, it only finds one).
pvcreate -qy ${G}p1 && vgcreate -q pve ${G}p1 && lvcreate -qy -n root -L 16M pve
pvcreate -qy ${G}p2 && vgcreate -q guestvg ${G}p2 && lvcreate -qy -n data -L 16M guestvg
vgchange -q -an pve
pvcreate -qy $H && vgcreate -q --devices $H pve $H && lvcreate -q --devices $H -y -n root -L 32M pve
yes | mdadm --create /dev/md0 -q --level=1 --raid-devices=2 --metadata=1.2 --run ${G}p3 ${G}p4
mdadm --wait /dev/md0
pvcreate -qy $R && vgcreate -q rvg $R && lvcreate -qy -n x -L 16M rvg
mkfs.ext4 -q /dev/guestvg/data
echo "host_uuid=$(pvs --noheadings -o vg_uuid $H | tr -d ' ')"
lvfacts
mkdir -p /etc/pve/qemu-server
printf 'onboot: 1\nmachine: q35\nhostpci0: %s,pcie=1\n' ${G1#0000:} > /etc/pve/qemu-server/100.conf
printf 'machine: q35\nhostpci0: %s,pcie=1\n' ${R1#0000:} > /etc/pve/qemu-server/101.conf

# The safety net: in use -> refused; unused -> deactivated, stopped, and the start goes on.
fact md_before "$(grep -c '^md' /proc/mdstat)"
mkdir -p /mnt/g && mount /dev/guestvg/data /mnt/g
run_hook refused 100 pre-start
umount /mnt/g
run_hook start1 100 pre-start
fact md_after_start1 "$(grep -c '^md' /proc/mdstat)"
run_hook stop1 100 post-stop
udevadm settle
fact g1_driver_after_stop1 $(vm_driver $G1)
fact md_after_stop1 "$(grep -c '^md' /proc/mdstat)"
echo "after_stop1:"; lvfacts

pvehook reserve 101 > /results/reserve.log 2>&1; fact rc_reserve $?
fact r1_driver_after_reserve $(vm_driver $R1)
echo "after_reserve:"; lvfacts
cp -a /etc/pve /state/etc-pve
cp -a /var/lib/pvehook /state/lib-pvehook
sync
"""

# Where the Debian package installs them (debian/pvehook.install).
INSTALL = r"""
set -x
mkdir -p /usr/libexec/pvehook
cp /src/data/udev/61-pvehook-guest.rules /src/data/udev/70-pvehook-guest.rules /usr/lib/udev/rules.d/
cp /src/data/modprobe.d/pvehook.conf /usr/lib/modprobe.d/
cp /src/data/reserve-vfio /usr/libexec/pvehook/
"""

REBOOT_PRE_UDEV = INSTALL + r"""
[ -d /state/lib-pvehook ] && cp -a /state/lib-pvehook /var/lib/pvehook
[ -d /state/etc-pve ] && cp -a /state/etc-pve/. /etc/pve/
# Every kernel uevent of a block or nvme device from now on, before udevd runs.
udevadm monitor --kernel --subsystem-match=block --subsystem-match=nvme > /results/uevents.log 2>&1 &
for i in $(seq 50); do grep -q "KERNEL - the kernel uevent" /results/uevents.log && break; sleep 0.1; done
modprobe dm_mod
"""

REBOOT = COMMON + r"""
modprobe raid1; udevadm settle
echo "after_boot:"; lvfacts
fact md_after_boot "$(grep -c '^md' /proc/mdstat 2>/dev/null)"
fact r1_driver_after_boot $(vm_driver $R1)
fact g1_driver_after_boot $(vm_driver $G1)
fact r1_in_dmesg "$(dmesg | grep -c "pci function $R1")"
fact g1_in_dmesg "$(dmesg | grep -c "pci function $G1")"
fact rvg_mapped "$(dmsetup ls 2>/dev/null | grep -c '^rvg-')"
# The onboot VM starts; a nested QEMU opens the device; it stops.
run_hook start2 100 pre-start
vm_vfio_open $G1; fact vfio_open_g1 $?
run_hook stop2 100 post-stop
udevadm settle
fact g1_driver_after_stop2 $(vm_driver $G1)
echo "after_stop2:"; lvfacts
fact md_after_stop2 "$(grep -c '^md' /proc/mdstat 2>/dev/null)"
run_hook start3 101 pre-start
vm_vfio_open $R1; fact vfio_open_r1 $?
run_hook stop3 101 post-stop
fact r1_driver_after_stop3 $(vm_driver $R1)
sleep 0.5  # let udevadm monitor write out what it has
"""


def facts(output: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^(\w+)=(.*)$", output, re.M))


def lv_sections(output: str) -> dict[str, dict[tuple[str, str, str], str]]:
    """'after_x:' headings, each followed by 'lv <uuid> <vg> <lv> <active>' lines."""
    out: dict[str, dict] = {}
    section = "setup"
    for line in output.splitlines():
        if re.match(r"^\w+:$", line):
            section = line[:-1]
        elif line.startswith("lv "):
            _lv, uuid, vg, lv, active = line.split()
            out.setdefault(section, {})[(uuid, vg, lv)] = active
    return out


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def boot(script, topo, workdir, **kw):
    res = run_guest(script, topo, timeout=600, workdir=workdir, **kw)
    print(res.output)
    print(f"boot took {res.duration:.1f} s")
    assert res.exit_code == 0, res.output
    return res


def check_reboot(res, topo, host_uuid, label, builtin=False):
    f = facts(res.output)
    lvs = lv_sections(res.output)
    log = lambda n: (res.results_dir / f"{n}.log").read_text()  # noqa: E731
    after_boot = lvs["after_boot"]
    host_pve = {k: v for k, v in after_boot.items() if k[0] == host_uuid}
    guest = {k: v for k, v in after_boot.items() if k[0] != host_uuid}
    # The guest's two VGs on G1 are seen (rvg on the reserved R1 is not: never on the host).
    assert sorted(k[1] for k in guest) == ["guestvg", "pve"], after_boot
    # No guest VG active after boot, whatever its name; the host's own pve is.
    assert set(guest.values()) == {"-"}, (label, after_boot)
    assert list(host_pve.values()) == ["active"], (label, after_boot)
    assert f["md_after_boot"] == "0", label
    # The reserved controller: on vfio-pci, and nvme never had it. With nvme built in,
    # nvme has it first and udev's rule moves it: its rvg is still never activated.
    assert f["r1_driver_after_boot"] == "vfio-pci", label
    assert f["rvg_mapped"] == "0", label
    assert f["g1_in_dmesg"] == "1", label
    r1 = topo.bdf("R1")
    uevents = (res.results_dir / "uevents.log").read_text()
    assert f"/{topo.bdf('G1')}/nvme/" in uevents  # the monitor did see nvme at work
    if builtin:
        assert f["r1_in_dmesg"] == "1", label
    else:
        assert f["r1_in_dmesg"] == "0", label
        assert f"/{r1}/" not in uevents, (label, uevents)
    # The onboot VM starts, stops, and nothing of the guest gets activated at give-back.
    assert f["rc_start2"] == "0", log("start2")
    assert f["vfio_open_g1"] == "0"
    assert f["rc_stop2"] == "0", log("stop2")
    assert f["g1_driver_after_stop2"] == "nvme"
    assert "deactivated" not in log("stop2")
    assert {v for k, v in lvs["after_stop2"].items() if k[0] != host_uuid} == {"-"}
    assert f["md_after_stop2"] == "0"
    assert "the guest's volume group 'pve' has the name of the host's" in log("stop2")
    # The reserved VM starts and stops; its controller stays on vfio-pci.
    assert f["rc_start3"] == "0", log("start3")
    assert f["vfio_open_r1"] == "0"
    assert f["rc_stop3"] == "0", log("stop3")
    assert f["r1_driver_after_stop3"] == "vfio-pci"


def test_guest_storage_across_reboots(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    topo = (Topology()
            .plain_disk("HOSTDISK", size="256M", image=str(images / "host.img"))
            .isolated_nvme("G1", size="256M", image=str(images / "g1.img"))
            .isolated_nvme("R1", size="128M", image=str(images / "r1.img")))

    res = boot(FIRST, topo, tmp_path / "boot1", pre_udev=INSTALL, state_dir=state)
    f = facts(res.output)
    log = lambda n: (res.results_dir / f"{n}.log").read_text()  # noqa: E731
    host_uuid = f["host_uuid"]
    setup = lv_sections(res.output)["setup"]
    assert {(k[1], k[2]) for k, v in setup.items() if v == "active"} >= {
        ("guestvg", "data"), ("rvg", "x")}
    # Safety net: refused while mounted; then deactivated and stopped, and the start goes on.
    assert f["rc_refused"] == "11", log("refused")
    assert "the host uses this disk" in log("refused")
    assert "volume group guestvg (on nvme0n1p2) is in use on the host" in log("refused")
    # md0 is not in use, but a refused start changes nothing: it says what it would stop
    # (deactivating waits until every check passed: the drive may not even be the VM's).
    assert "would stop md array md0" in log("refused")
    assert "stopped md array" not in log("refused")
    assert f["rc_start1"] == "0", log("start1")
    assert "deactivated volume group guestvg" in log("start1")
    assert f["md_before"] == "1" and f["md_after_start1"] == "0"
    assert f["rc_stop1"] == "0", log("stop1")
    assert f["g1_driver_after_stop1"] == "nvme"
    assert "deactivated" not in log("stop1")  # nothing was activated at give-back
    assert {v for k, v in lv_sections(res.output)["after_stop1"].items()
            if k[1] != "rvg" and k[0] != host_uuid} == {"-"}
    assert f["md_after_stop1"] == "0"
    assert f["rc_reserve"] == "0", log("reserve")
    assert "deactivated volume group rvg" in log("reserve")
    assert f["r1_driver_after_reserve"] == "vfio-pci"

    # nvme built in: loaded before udev without pvehook's `install nvme` line, as a
    # kernel with CONFIG_BLK_DEV_NVME=y binds it before any user space runs.
    for label, pre, builtin in (
            ("udev loads nvme", REBOOT_PRE_UDEV, False),
            ("nvme loaded before udev", REBOOT_PRE_UDEV + "modprobe nvme\n", False),
            ("nvme built in", REBOOT_PRE_UDEV + "modprobe --ignore-install nvme\n", True)):
        before = {n: sha256(images / n) for n in ("g1.img", "r1.img")}
        res = boot(REBOOT, topo, tmp_path / label.replace(" ", "-"), pre_udev=pre,
                   state_dir=state)
        check_reboot(res, topo, host_uuid, label, builtin)
        after = {n: sha256(images / n) for n in ("g1.img", "r1.img")}
        assert after == before, f"{label}: the host wrote to a guest's disk"
