"""Between a stop and the next start: reboots, and starts that fail after pre-start.

What qemu-server 9.2 does (src/PVE/QemuServer.pm, src/PVE/CLI/qm.pm):
- `qm reboot` (vm_reboot) writes /run/qemu-server/<vmid>.reboot, then shuts the VM
  down; post-stop runs (in vm_stop_cleanup, or from `qm cleanup` that qmeventd starts
  when QEMU is gone) while that file exists; `qm cleanup` then removes it and starts the
  VM again, and pre-start runs. A reboot inside the guest is a reset within the same
  QEMU process: no hook runs and the devices stay where they are. With `reboot: 0` the
  guest's reboot stops the VM for good (post-stop without the file: the devices go back).
- A start that fails after pre-start (config_to_command dies, QEMU exits, the start
  timeout passes) deactivates volumes and drops the PCI reservations, but runs no
  post-stop. The start's deadline is Helpers.pm config_aware_timeout.

So post-stop with the reboot file keeps the devices on vfio-pci, and both pre-start and
such a post-stop schedule a deferred release (later.py) that gives the devices back
unless the VM runs by then or a newer start took its record over (the generation).
"""

from __future__ import annotations

import os
import re
import time

from .paths import Root
from .tasklog import log

# Seconds after qemu-server's start timeout before the release runs: what comes before
# QEMU's own start (volumes, `systemctl stop <vmid>.scope` up to 20 s, cloud-init) and
# `qm cleanup` waiting for the config lock between a reboot's stop and start.
MARGIN_S = 60


def reboot_requested(root: Root, vmid: int) -> bool:
    return root.run("qemu-server", f"{vmid}.reboot").exists()


def _memory_mib(value: str | None) -> int | None:
    # `memory: 4096` or the property string `memory: current=4096`.
    if value is None:
        return None
    m = re.search(r"(?:^|,)(?:current=)?(\d+)(?:,|$)", value)
    return int(m[1]) if m else None


def start_timeout(options: dict[str, str]) -> int:
    """qemu-server's start timeout for this config (Helpers.pm config_aware_timeout)."""
    timeout = 30
    memory = _memory_mib(options.get("memory"))
    if memory is not None and memory > 30720:
        timeout = memory // 1024
    if any(re.fullmatch(r"hostpci\d+", k) for k in options):
        timeout *= 4
    suspended = "vmstate" in options or options.get("lock") == "suspended"
    if suspended and timeout < 300:
        timeout = 300
    if options.get("hugepages") and timeout < 150:
        timeout = 150
    return timeout + 5 * sum(1 for k in options if re.match(r"net\d+", k))


def give_back_delay(ctx, vmid: int) -> float:
    """How long a start (or a reboot's restart) may take before the devices go back."""
    if ctx.timeouts.give_back is not None:
        return ctx.timeouts.give_back
    from .vmconfig import VmConfig

    try:
        options = VmConfig.load(ctx.root, vmid).options
    except Exception:  # the config vanished: the release then finds the VM not running
        options = {"hostpci0": ""}
    return float(start_timeout(options) + MARGIN_S)


def new_generation() -> str:
    """Names one pre-start: unique within a boot (/run and the timers end with it)."""
    return f"{time.monotonic_ns():x}{os.getpid():x}"


def schedule_release(ctx, vmid: int, generation: str, why: str) -> bool:
    """Have the devices of this record go back unless the VM runs after the bound.
    False (and a warning) when nothing could be scheduled."""
    delay = give_back_delay(ctx, vmid)
    try:
        how = ctx.later.release_after(ctx, vmid, generation, delay)
    except Exception as e:
        log.warning("VM %d: could not schedule the give-back (%s): %s; if the VM does not"
                    " run, give its devices back with `pvehook release %d`", vmid, why, e,
                    vmid)
        return False
    log.info("VM %d: its devices go back to the host if it is not running in %.0f s"
             " (%s; %s)", vmid, delay, why, how)
    return True


def needs_release(record) -> bool:
    """Does any device of the record have a driver to go back to?"""
    from .iommu import VFIO

    return any(d.original_driver != VFIO for d in record.devices)
