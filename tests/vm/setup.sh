#!/bin/bash
# Build (or check) everything the real-kernel harness needs: host packages, a Debian
# trixie tree, trixie's kernel and a busybox initramfs. Idempotent: each part has a
# stamp file carrying a version string; bump the version to force a rebuild of that part.
# Usage (as root): tests/vm/setup.sh            -> prints the cache dir on the last line
# Env: PVEHOOK_VM_CACHE (default /var/cache/pvehook-vm), PVEHOOK_VM_MIRROR.
set -euo pipefail

CACHE=${PVEHOOK_VM_CACHE:-/var/cache/pvehook-vm}
MIRROR=${PVEHOOK_VM_MIRROR:-http://deb.debian.org/debian}
HERE=$(cd "$(dirname "$0")" && pwd)

HOST_PKGS="qemu-system-x86 debootstrap busybox-static cpio xz-utils zstd kmod"
TREE_PKGS="python3,python3-pyudev,python3-click,python3-filelock,python3-proxmoxer,python3-pytest,\
udev,kmod,lvm2,thin-provisioning-tools,qemu-system-x86,fdisk,e2fsprogs,util-linux,mount,\
procps,psmisc,time,busybox,nvme-cli,pciutils,jq,less,mdadm,passwd"
# Versions: change one to rebuild that part (and the ones built from it).
TREE_VER="trixie-1:$TREE_PKGS"
KERNEL_VER="trixie-kernel-1"
# One initramfs per version of init.sh (initrd-<hash>.img), so work trees with different
# init.sh versions share the cache without rebuilding it back and forth.
INITRD_HASH=$(sha256sum "$HERE/init.sh" | cut -c1-16)
INITRD=$CACHE/initrd-$INITRD_HASH.img

[ "$(id -u)" = 0 ] || { echo "setup.sh: must run as root" >&2; exit 1; }
mkdir -p "$CACHE/stamps"
# Several test runs (work trees) may call this at once: one at a time.
exec 9>"$CACHE/.setup.lock"
flock 9
log() { echo "[setup.sh $(date +%T)] $*" >&2; }

# stamp_ok PART VERSION: true if PART was built with exactly VERSION.
stamp_ok() { [ -f "$CACHE/stamps/$1" ] && [ "$(cat "$CACHE/stamps/$1")" = "$2" ]; }
stamp_set() { printf '%s' "$2" >"$CACHE/stamps/$1"; }

# --- host packages: dpkg query first so the cached path never touches apt --------------
missing=""
for p in $HOST_PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
    log "installing host packages:$missing"
    # Another apt may hold the lock (e.g. a provisioning run): wait for it.
    export DEBIAN_FRONTEND=noninteractive
    # Retries cover stale package lists (update once) and another apt holding the lock.
    for i in $(seq 30); do
        if apt-get install -y -q --no-install-recommends $missing >&2; then missing=""; break; fi
        [ "$i" = 1 ] && { apt-get update -q >&2 || true; continue; }
        log "apt-get install failed (dpkg lock?), retrying in 10 s"; sleep 10
    done
    [ -z "$missing" ] || { echo "setup.sh: could not install$missing" >&2; exit 1; }
fi

# --- trixie tree -----------------------------------------------------------------------
TREE=$CACHE/trixie
if ! stamp_ok tree "$TREE_VER"; then
    log "debootstrap trixie into $TREE (about a minute)"
    rm -rf "$TREE" "$CACHE/stamps/kernel" "$CACHE"/initrd-*.img
    debootstrap --variant=minbase --include="$TREE_PKGS" trixie "$TREE" "$MIRROR" >&2
    # Package lists inside the tree, used below to find and fetch the kernel.
    chroot "$TREE" apt-get update -q >&2
    chroot "$TREE" apt-get clean
    stamp_set tree "$TREE_VER"
fi

# --- trixie kernel -----------------------------------------------------------------------
KDIR=$CACHE/kernel
if ! stamp_ok kernel "$KERNEL_VER"; then
    log "fetching trixie's kernel"
    rm -rf "$KDIR" "$CACHE"/initrd-*.img
    chroot "$TREE" apt-get update -q >&2
    # linux-image-amd64 is a metapackage; its Depends names the versioned image package.
    kpkg=$(chroot "$TREE" apt-cache depends linux-image-amd64 |
           sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -1)
    [ -n "$kpkg" ] || { echo "setup.sh: no versioned kernel package found" >&2; exit 1; }
    log "kernel package: $kpkg"
    rm -rf "$TREE/tmp/kdl"; mkdir -p "$TREE/tmp/kdl"
    chroot "$TREE" sh -c "cd /tmp/kdl && apt-get -o APT::Sandbox::User=root download -q $kpkg" >&2
    mkdir -p "$KDIR"
    dpkg-deb -x "$TREE"/tmp/kdl/*.deb "$KDIR"
    rm -rf "$TREE/tmp/kdl"
    kver=$(ls "$KDIR/usr/lib/modules" | head -1)
    depmod -b "$KDIR/usr" "$kver" 2>/dev/null || depmod -b "$KDIR" "$kver"
    ln -sfn "boot/vmlinuz-$kver" "$KDIR/vmlinuz"
    echo "$kver" >"$KDIR/version"
    stamp_set kernel "$KERNEL_VER"
fi
kver=$(cat "$KDIR/version")

# --- initramfs ---------------------------------------------------------------------------
if [ ! -e "$INITRD" ]; then
    log "building initramfs"
    work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
    mkdir -p "$work"/{bin,sbin,proc,sys,dev,newroot,host,results,ovl,mods}
    cp /bin/busybox "$work/bin/busybox"
    cp "$HERE/init.sh" "$work/init"; chmod 755 "$work/init"
    # modprobe --show-depends lists the .ko files in load order (dependencies first);
    # busybox insmod cannot read .ko.xz, so decompress into the initramfs.
    : >"$work/mods/order"
    for m in 9p 9pnet_virtio overlay; do
        modprobe -d "$KDIR/usr" -S "$kver" --show-depends "$m" 2>/dev/null ||
            modprobe -d "$KDIR" -S "$kver" --show-depends "$m"
    done | awk '$1=="insmod"{print $2}' | while read -r ko; do
        name=$(basename "$ko"); name=${name%.xz}; name=${name%.zst}
        grep -qx "$name" "$work/mods/order" && continue
        case "$ko" in
            *.xz) xz -dc "$ko" >"$work/mods/$name" ;;
            *.zst) zstd -qdc "$ko" >"$work/mods/$name" ;;
            *) cp "$ko" "$work/mods/$name" ;;
        esac
        echo "$name" >>"$work/mods/order"
    done
    log "initramfs modules: $(tr '\n' ' ' <"$work/mods/order")"
    (cd "$work" && find . | cpio -o -H newc --quiet | gzip -1) >"$INITRD.tmp.$$"
    mv "$INITRD.tmp.$$" "$INITRD"
fi

echo "$CACHE"
