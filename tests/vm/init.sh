#!/bin/busybox sh
# PID 1 of the harness's initramfs (copied in as /init by setup.sh).
# Builds the guest root from 9p shares, starts udev, runs /results/script.sh in a chroot,
# prints the sentinel "PVEHOOK-VM-EXIT=<rc>" on the console and powers off.
# Kernel command line: pvehook.cache=<host cache dir> pvehook.src=<host source dir>
/bin/busybox --install -s /bin
export PATH=/bin:/sbin

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

say() { echo "pvehook-init: $*" >/dev/console; }
die() {
    say "ERROR: $*"
    echo "PVEHOOK-VM-ERROR: $*" >/dev/console
    sync
    echo o >/proc/sysrq-trigger
    sleep 10
}

for m in $(cat /mods/order); do
    insmod "/mods/$m" || die "insmod $m failed"
done

CACHE=/var/cache/pvehook-vm
SRC=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        pvehook.cache=*) CACHE=${arg#pvehook.cache=} ;;
        pvehook.src=*) SRC=${arg#pvehook.src=} ;;
    esac
done

# msize: larger 9p messages make reads from the host noticeably faster.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /host ||
    die "mount hostroot"
# The results share is written by the guest and read by the host: no caching.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /results || die "mount results"

# Writable root: tmpfs upper over the read-only trixie tree.
mount -t tmpfs -o mode=755 tmpfs /ovl
mkdir -p /ovl/upper /ovl/work
mount -t overlay overlay \
    -o "lowerdir=/host$CACHE/trixie,upperdir=/ovl/upper,workdir=/ovl/work" /newroot ||
    die "overlay over /host$CACHE/trixie"

R=/newroot
mkdir -p $R/usr/lib/modules $R/src $R/results $R/host
mount --bind "/host$CACHE/kernel/usr/lib/modules" $R/usr/lib/modules || die "bind modules"
[ -n "$SRC" ] && { mount --bind "/host$SRC" $R/src || die "bind src $SRC"; }
mount --bind /results $R/results
mount --bind /host $R/host
# Optional writable share that outlives the boot (a node's disk across reboots).
mkdir -p $R/state
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 state $R/state 2>/dev/null ||
    rmdir $R/state
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs -o mode=755 tmpfs $R/run
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
ln -sf /proc/self/fd $R/dev/fd
ln -sf /proc/self/fd/0 $R/dev/stdin
ln -sf /proc/self/fd/1 $R/dev/stdout
ln -sf /proc/self/fd/2 $R/dev/stderr
mkdir -p $R/run/udev $R/run/lock $R/run/lvm

# Stage 2 runs inside the chroot with bash. The script's output goes to
# /results/out.log (what the host returns as output) and, prefixed with "[script] ",
# to the console so a hung run can be diagnosed from the console log.
cat >$R/run/pvehook-stage2.sh <<'EOF'
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb
export SYSTEMD_IGNORE_CHROOT=1 PYTHONPATH=/src PYTHONDONTWRITEBYTECODE=1
# What a node does before udev sees its devices (restore /etc, install a package...).
[ -f /results/pre-udev.sh ] && bash /results/pre-udev.sh </dev/null >/results/pre-udev.log 2>&1
/usr/lib/systemd/systemd-udevd --daemon >/dev/null 2>&1
udevadm trigger --type=subsystems --action=add
udevadm trigger --type=devices --action=add
udevadm settle --timeout=60
[ -f /results/env.sh ] && . /results/env.sh
cd /src 2>/dev/null || cd /
echo "pvehook-init: running script" >/dev/console
{ bash /results/script.sh </dev/null; echo $? >/results/rc; } 2>&1 |
    tee /results/out.log | sed -u 's/^/[script] /' >/dev/console
EOF
chroot $R /bin/bash /run/pvehook-stage2.sh
rc=$(cat $R/results/rc 2>/dev/null)
[ -n "$rc" ] || rc=255
sync
echo "PVEHOOK-VM-EXIT=$rc" >/dev/console
echo o >/proc/sysrq-trigger
sleep 10
