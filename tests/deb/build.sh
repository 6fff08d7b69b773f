#!/usr/bin/env bash
# Build the Debian package the way Debian does, and check it with lintian.
#   bash tests/deb/build.sh        -> prints the path of dist/deb/pvehook_<version>_all.deb
# Installs the Build-Depends of debian/control (apt-get build-dep), builds a copy of the
# work tree (so the tree stays clean and others' edits cannot race the build) with
# `dpkg-buildpackage -us -uc -b` under a clean PATH (pyenv's or a venv's python3 first on
# PATH breaks pybuild), runs lintian (fails on errors and warnings; none is overridden:
# an override would go in debian/pvehook.lintian-overrides with its reason), and copies
# the results into dist/deb/. Offline once the Build-Depends are installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
OUT=$REPO/dist/deb
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
log() { echo "[deb/build.sh $(date +%T)] $*" >&2; }

# --- build tools: the Build-Depends themselves, plus lintian --------------------------
if ! dpkg-checkbuilddeps 2>/dev/null || ! command -v lintian >/dev/null; then
    log "installing the Build-Depends and lintian"
    export DEBIAN_FRONTEND=noninteractive
    for i in $(seq 30); do
        if apt-get install -y -q --no-install-recommends dpkg-dev lintian >&2 &&
           apt-get build-dep -y -q ./ >&2; then break; fi
        [ "$i" = 30 ] && { echo "deb/build.sh: cannot install the build tools" >&2; exit 1; }
        [ "$i" = 1 ] && { apt-get update -q >&2 || true; continue; }
        log "apt-get failed (dpkg lock?), retrying in 10 s"; sleep 10
    done
fi

# --- build a copy of the work tree ------------------------------------------------------
version=$(dpkg-parsechangelog -SVersion)
work=$(mktemp -d /tmp/pvehook-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir "$work/pvehook-$version"
tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist --exclude=./.pybuild \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=./.benchmarks \
    --exclude='*.egg-info' --exclude=./debian/pvehook --exclude=./debian/.debhelper \
    -cf - . | tar -C "$work/pvehook-$version" -xf -
# qemu-server's test configs, for tests/unit/test_corpus.py (skipped when absent).
corpus=$(cd "$REPO/.." && pwd)/shared/corpus/qemu-server
[ -d "$corpus" ] && export PVEHOOK_CORPUS=${PVEHOOK_CORPUS:-$corpus}
log "dpkg-buildpackage -us -uc -b ($version)"
t0=$SECONDS
(cd "$work/pvehook-$version" && env -u PYTHONPATH -u VIRTUAL_ENV dpkg-buildpackage -us -uc -b) \
    >"$work/build.log" 2>&1 || { tail -80 "$work/build.log" >&2; echo "deb/build.sh: build failed" >&2; exit 1; }
grep -E '^(SKIPPED|.*[0-9]+ (passed|failed))' "$work/build.log" | sed 's/^/  build tests: /' >&2 || true
log "built in $((SECONDS - t0)) s"

log "lintian"
lintian --fail-on error,warning --display-info --tag-display-limit 0 \
    "$work/pvehook_${version}_amd64.changes" >"$work/lintian.log" 2>&1 || {
    cat "$work/lintian.log" >&2; echo "deb/build.sh: lintian found errors or warnings" >&2; exit 1; }
grep -v 'running with root privileges' "$work/lintian.log" | sed 's/^/  lintian: /' >&2 || true

mkdir -p "$OUT"
rm -f "$OUT"/pvehook_*
cp "$work"/pvehook_"$version"_all.deb "$work"/pvehook_"$version"_*.buildinfo \
   "$work"/pvehook_"$version"_*.changes "$work/build.log" "$work/lintian.log" "$OUT/"
echo "$OUT/pvehook_${version}_all.deb"
