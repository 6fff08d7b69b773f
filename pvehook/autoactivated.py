"""pre-start's safety net: the guest's storage that the host activated anyway.

The package's udev rules keep lvm2 and mdadm off the disks of listed controllers, but a
disk can have been activated before it was listed (a VM registered after boot, an admin's
`vgchange -ay`). When every PV of such a volume group (every member of such an md array)
lies on disks of controllers this VM is given, and nothing uses it (no LV open: not
mounted, no swap, nothing stacked on it; an md array without holders or mounts), it is
the guest's own storage and the host only activated it: pre-start deactivates it and says
so. Anything in use stays, and the host-use check refuses the start as before.

Only runs a command when a namespace of the VM has holders: the normal start costs
nothing here.
"""

from __future__ import annotations

from .block import BlockDevice, namespaces
from .paths import Root
from .pci import PciDevice
from .usage import mounts, swaps


def _members(disks: list[BlockDevice]) -> dict[str, BlockDevice]:
    return {b.name: b for d in disks for b in (d, *d.partitions())}


def release(root: Root, vm_devices: list[PciDevice], lines: list[str],
            apply: bool = True) -> set[str]:
    """Deactivate what the host activated on these controllers' disks and nobody uses;
    append one line per decision to `lines`. Returns the names of the holders (dm-N,
    mdN) that go (with apply=False, `pvehook check`: would go)."""
    per_dev = [(dev, namespaces(dev)) for dev in vm_devices if dev.driver == "nvme"]
    members = _members([d for _, disks in per_dev for d in disks])
    held = {n: b.holders() for n, b in members.items()}
    gone: set[str] = set()
    if not any(held.values()):
        return gone
    # (name, dm uuid) read now: once deactivated, the dm devices and their uuids are gone
    dm = [(h.name, h.dm_uuid) for hs in held.values() for h in hs
          if h.dm_uuid and h.dm_uuid.startswith("LVM-")]
    if dm:
        for uuid in _release_lvm(root, members, lines, apply):
            # device-mapper's uuid of an LV: "LVM-" + the VG's uuid without dashes + the LV's
            prefix = "LVM-" + uuid.replace("-", "")
            gone |= {name for name, dm_uuid in dm if dm_uuid.startswith(prefix)}
    md = {h.name: h for hs in held.values() for h in hs if h.name.startswith("md")}
    if md:
        gone |= _release_md(root, members, md, lines, apply)
    return gone


def _release_lvm(root: Root, members: dict[str, BlockDevice], lines: list[str],
                 apply: bool) -> list[str]:
    from . import lvm

    pvs = lvm.report("pvs", "pv_name,vg_name,vg_uuid")
    by_vg: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    for r in pvs:
        if r.get("vg_uuid"):
            by_vg.setdefault(r["vg_uuid"], []).append(lvm.pv_kernel_name(r["pv_name"]))
            names[r["vg_uuid"]] = r["vg_name"]
    released = []
    for uuid, pv_names in sorted(by_vg.items()):
        ours = [p for p in pv_names if p in members]
        if not ours:
            continue
        vg = names[uuid]
        lvs = lvm.report("lvs", "lv_name,lv_active,lv_device_open", "--select", f"vg_uuid={uuid}")
        active = [r["lv_name"] for r in lvs if r.get("lv_active") == "active"]
        if not active:
            continue
        elsewhere = sorted(set(pv_names) - set(members))
        opened = [r["lv_name"] for r in lvs if r.get("lv_device_open") == "open"]
        if elsewhere:
            lines.append(f"volume group {vg} is active on the host and also has PVs on"
                         f" {', '.join(elsewhere)}, which this VM is not given: left as it is")
        elif opened:
            lines.append(f"volume group {vg} (on {', '.join(sorted(ours))}) is in use on the host"
                         f" (open: {', '.join(opened)}): left as it is")
        else:
            if apply:
                lvm.run(["lvm", "vgchange", "--activate", "n", "--select", f"vg_uuid={uuid}"])
            lines.append(f"{'deactivated' if apply else 'would deactivate'} volume group {vg}"
                         f" on {', '.join(sorted(ours))}: the guest's own, activated by the"
                         " host, not in use on the host")
            released.append(uuid)
    return released


def _release_md(root: Root, members: dict[str, BlockDevice], arrays: dict[str, BlockDevice],
                lines: list[str], apply: bool) -> set[str]:
    import shutil  # only here: the hook's normal start does not need it

    mdadm = shutil.which("mdadm")
    mounted = {m.devnum for m in mounts(root)}
    swap = swaps(root)
    stopped: set[str] = set()
    for name, md in sorted(arrays.items()):
        slaves = md.slaves()
        outside = sorted(s for s in slaves if s not in members)
        busy = [h.label() for h in md.holders()]
        for b in (md, *md.partitions()):
            if b.devnum in mounted or f"/dev/{b.name}" in swap:
                busy.append(f"{b.name} mounted or swap")
        if outside:
            lines.append(f"md array {name} also has members on {', '.join(outside)}, which this"
                         " VM is not given: left as it is")
        elif busy:
            lines.append(f"md array {name} is in use on the host ({', '.join(busy)}): left as it is")
        elif mdadm is None:
            lines.append(f"md array {name} is assembled on the host and mdadm is not installed:"
                         " left as it is")
        else:
            if apply:
                from . import lvm

                lvm.run([mdadm, "--stop", f"/dev/{name}"])
            lines.append(f"{'stopped' if apply else 'would stop'} md array {name} on"
                         f" {', '.join(slaves)}: the guest's own, assembled by the host, not"
                         " in use on the host")
            stopped.add(name)
    return stopped
