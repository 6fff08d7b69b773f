#!/usr/bin/env bash
# The newcomer's first command: builds the real-kernel guest (once: packages, a Debian
# trixie tree, trixie's kernel), boots it with two identical NVMe controllers, and shows
# the hookscript doing its job there: VM config, pre-start, the device on vfio-pci, a
# nested QEMU opening it, post-stop, the device back on nvme with its data.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "demo: run as root (it installs packages and boots QEMU)" >&2; exit 1; }
# A fresh Debian machine may have no python3 yet (demo.py runs the guest with it).
command -v python3 >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3; }
echo "== setting up the guest (cached after the first run) =="
bash tests/vm/setup.sh >/dev/null
exec python3 tests/vm/demo.py
