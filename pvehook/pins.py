"""Drive pins: the drive each VM of this node was given, checked at every start.

`hostpci0: 0000:03:00.0` names a slot. After a renumbering (BIOS update, a new card, a
drive moved to another slot) the same line names another drive: perhaps another VM's
disk. So pvehook keeps, per VM and hostpci entry, the identity of the drive it passes
(identity.py), pinned at `pvehook register`, by `pvehook pin <vmid> --accept`, or at
the VM's first successful start (trust on first use, said in the task log), and refuses
a start whose drive is not the pinned one.

The store is /var/lib/pvehook/pins.json (`Root.lib_dir`): it must survive reboots,
because a renumbering happens at a reboot. It is node-local on purpose: PCI addresses
and drives belong to one node, and /etc/pve (the cluster's shared files) is no place for
them; a VM that migrates is pinned again at its first start on the new node. Root only:
the directory 0700, the file 0600, written atomically (temp file, fsync, rename) under
an flock, and opened with O_NOFOLLOW.

The store also keeps, per address, the identity last read from nvme in this boot
(`seen`): a controller on vfio-pci cannot show its NVMe serial, and where it has no PCIe
Device Serial Number that record is all there is. A record from an earlier boot proves
nothing: the renumbering this guards against happens at a reboot.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager

from . import identity
from .errors import ConfigError, DriveMismatchError, PvehookError
from .holds import Holds
from .pci import PciDevice

STORE = "pins.json"
LOCK = ".pins.lock"


def boot_id(root) -> str | None:
    try:
        return root.proc("sys", "kernel", "random", "boot_id").read_text().strip() or None
    except OSError:
        return None


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


# -- the store -------------------------------------------------------------------------------

class PinStore:
    """{"vms": {vmid: {hostpci key: [pin]}}, "seen": {address: seen}}; a pin is
    {"address", "identity", "time", "how"}, a seen record {"identity", "boot_id", "time"}."""

    def __init__(self, root):
        self.root = root
        self.dir = root.lib_dir
        self.path = self.dir / STORE

    def load(self) -> dict:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return {"vms": {}, "seen": {}}
        except PermissionError:
            raise
        except OSError as e:  # ELOOP: a symlink planted in its place
            raise ConfigError(f"cannot open the pin store {self.path}: {e.strerror or e}",
                              hint="it must be a regular file owned by root") from None
        try:
            with os.fdopen(fd) as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise ConfigError(f"the pin store {self.path} is damaged: {e}",
                              hint="restore it from a backup, or remove it (every VM's drives"
                                   " are then pinned again at their next start)") from None
        data.setdefault("vms", {})
        data.setdefault("seen", {})
        return data

    def _save(self, data: dict) -> None:
        tmp = self.dir / f".{STORE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)  # the rename itself survives a crash
        finally:
            os.close(dfd)

    @contextmanager
    def update(self):
        """Load under the store's lock, let the caller change the data, save it."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = self.load()
            yield data
            self._save(data)
        finally:
            os.close(fd)


def pin_record(address, ident: dict, how: str) -> dict:
    return {"address": str(address), "identity": ident, "time": time.time(), "how": how}


def record_seen(data: dict, root, observed: list) -> None:
    boot = boot_id(root)
    for obs in observed:
        if obs.nvme is not None and boot:
            data["seen"][str(obs.address)] = {"identity": obs.nvme, "boot_id": boot,
                                              "time": time.time()}


# -- what is at an address now ---------------------------------------------------------------

class Observed:
    """What pvehook can tell about the drive at one address: its identity read from nvme,
    its PCIe Device Serial Number, and the record of it on nvme in this boot."""

    __slots__ = ("address", "driver", "nvme", "dsn", "seen")

    def __init__(self, address, driver, nvme, dsn, seen):
        self.address, self.driver, self.nvme, self.dsn, self.seen = address, driver, nvme, dsn, seen

    @property
    def recorded(self) -> dict | None:
        """The identity recorded on nvme in this boot, unless its DSN contradicts it."""
        if self.seen is None or (self.dsn and self.seen["identity"].get("dsn") not in (None, self.dsn)):
            return None
        return self.seen["identity"]

    @property
    def best(self) -> dict | None:
        """The fullest identity known for it (to pin, or to name it)."""
        if self.nvme is not None:
            return self.nvme
        if self.recorded is not None:
            return self.recorded
        return {"dsn": self.dsn} if self.dsn else None

    def matches(self, pinned: dict) -> tuple[bool | None, str]:
        """(same drive?, how that was told); None: it cannot be told."""
        if self.nvme is not None:
            return identity.same_drive(self.nvme, pinned), "read from the controller"
        if self.dsn and pinned.get("dsn"):
            return self.dsn == pinned["dsn"], f"by its PCIe Device Serial Number {self.dsn}"
        if self.recorded is not None:
            return identity.same_drive(self.recorded, pinned), self._recorded_how()
        return None, ""

    def _recorded_how(self) -> str:
        how = f"as recorded when it was last on nvme, {_when(self.seen['time'])}"
        if self.seen.get("reserved"):
            how += (" (reserved since, on vfio-pci from boot on: without a PCIe Device Serial"
                    " Number a drive swapped while the node was off cannot be told apart)")
        return how

    def describe(self) -> str:
        return identity.describe(self.best)

    def source(self) -> str:
        """How `best` was told."""
        if self.nvme is not None:
            return "read from the controller"
        if self.recorded is not None:
            return self._recorded_how()
        return f"by its PCIe Device Serial Number {self.dsn}" if self.dsn else ""

    def unknown_why(self) -> str:
        return (f"it is on {self.driver or 'no driver'}, has no PCIe Device Serial Number"
                f"{' pvehook can compare' if self.dsn else ''} and was not seen on nvme"
                " since this boot began")


def observe(root, dev: PciDevice, data: dict, boot: str | None) -> Observed:
    nvme = identity.read(dev) if dev.driver == "nvme" else None
    dsn = nvme["dsn"] if nvme is not None else identity.read_dsn(dev)
    seen = data["seen"].get(str(dev.address))
    if seen is not None and (not boot or seen.get("boot_id") != boot):
        # Recorded in an earlier boot: it speaks for the drive only at a reserved address
        # (`pvehook reserve`), which has stayed on vfio-pci from boot on since; elsewhere
        # a renumbering at that reboot could have put another drive there.
        from . import guestlist

        reserved = str(dev.address) in guestlist.read(root, guestlist.RESERVED)
        seen = {**seen, "reserved": True} if reserved else None
    return Observed(dev.address, dev.driver, nvme, dsn, seen)


def locate(root, pinned: dict, data: dict, boot: str | None, skip=()) -> list:
    """Every address of this node where the pinned drive is now."""
    return [d.address for d in PciDevice.all(root)
            if d.address not in skip and d.is_nvme and observe(root, d, data, boot).matches(pinned)[0]]


def owners(data: dict, obs: Observed, but: int | None = None) -> list[tuple[str, dict]]:
    """(`VM 101 (hostpci0)`, its pinned identity) for every other VM whose drive this is."""
    out = []
    for vmid, entries in sorted(data["vms"].items(), key=lambda kv: int(kv[0])):
        if but is not None and int(vmid) == but:
            continue
        for key, pins in sorted(entries.items()):
            for p in pins:
                if obs.matches(p["identity"])[0]:
                    out.append((f"VM {vmid} ({key})", p["identity"]))
                    break
    return out


# -- pre-start -------------------------------------------------------------------------------

class PinCheck:
    """The pin check's outcome for one plan: one result per device, what to record."""

    def __init__(self):
        self.results: list[dict] = []  # for `pvehook check --json`
        self.observed: list[Observed] = []
        self.new_pins: list[tuple[str, Observed]] = []  # (hostpci key, drive) to pin


def check_pins(ctx, plan, managed: list[PciDevice]) -> None:
    """Every managed device must hold the drive pinned for its hostpci entry; a drive of an
    entry without a pin is pinned once the start succeeded (`commit`)."""
    result = plan.pins = PinCheck()
    if not managed:
        return
    data = PinStore(ctx.root).load()
    boot = boot_id(ctx.root)
    vm_pins = data["vms"].get(str(plan.vmid), {})
    # A drive another running VM holds is refused as held (12), pinned or not.
    holds = Holds(ctx.root, ctx.records, plan.vmid)
    for dev in managed:
        entry = plan.entries.get(dev.address)
        key = entry.key if entry is not None else "?"
        obs = observe(ctx.root, dev, data, boot)
        result.observed.append(obs)
        addr = dev.address
        pins = vm_pins.get(key) or []
        item = {"key": key, "address": str(addr), "now": obs.best, "pinned": None,
                "verdict": None, "how": None}
        result.results.append(item)
        if not pins:
            if obs.best is None or not (obs.best.get("serial") or obs.best.get("dsn")):
                item["verdict"] = "cannot pin"
                plan.lines.append(f"{addr}: VM {plan.vmid} has no pinned drive for {key}, and"
                                  f" this one cannot be identified now ({obs.unknown_why()}):"
                                  " it is pinned at a start where nvme has it")
            elif owners(data, obs, plan.vmid) and not holds.holder(addr):
                # Another VM's disk while that VM is off: exactly what pins are for; a new
                # entry does not take it on trust.
                others = ", ".join(o for o, _ in owners(data, obs, plan.vmid))
                item.update(verdict="pinned for another VM", how=obs.source())
                plan.refusals.append(DriveMismatchError(
                    f"{addr} holds {obs.describe()}, the pinned drive of {others}; {key} of VM"
                    f" {plan.vmid} has no pinned drive yet, and pvehook does not give another"
                    " VM's drive on trust",
                    hint=f"correct {key}, or, if VM {plan.vmid} is meant to share that drive,"
                         f" run `pvehook pin {plan.vmid} --accept`"))
            else:
                item.update(verdict="to pin", how=obs.source())
                result.new_pins.append((key, obs))
                plan.lines.append(f"{addr}: {obs.describe()}; {key} of VM {plan.vmid} has no"
                                  " pinned drive yet: pinned when this start succeeds (trust on"
                                  " first use)")
            continue
        verdicts = [(p, *obs.matches(p["identity"])) for p in pins]
        hit = next(((p, how) for p, ok, how in verdicts if ok), None)
        if hit is not None:
            pin, how = hit
            item.update(pinned=pin["identity"], verdict="ok", how=how)
            extra = identity.changes(pin["identity"], obs.nvme) if obs.nvme else []
            plan.lines.append(f"{addr}: VM {plan.vmid}'s pinned drive {identity.describe(pin['identity'])}"
                              f" ({how})" + (f"; since pinned: {', '.join(extra)}" if extra else ""))
            continue
        pin = next((p for p in pins if p["address"] == str(addr)), pins[0])
        item["pinned"] = pin["identity"]
        wanted = identity.describe(pin["identity"])
        if all(ok is None for _p, ok, _how in verdicts):
            item["verdict"] = "unverified"
            plan.refusals.append(DriveMismatchError(
                f"{addr}: cannot confirm it holds VM {plan.vmid}'s pinned drive {wanted}:"
                f" {obs.unknown_why()}",
                hint=f"let nvme take it once so its serial can be read (echo > /sys/bus/pci/"
                     f"devices/{addr}/driver_override; echo {addr} > /sys/bus/pci/devices/{addr}"
                     f"/driver/unbind; echo {addr} > /sys/bus/pci/drivers_probe), then start"
                     f" again"))
            continue
        item["verdict"] = "mismatch"
        item["how"] = next(how for _p, ok, how in verdicts if ok is not None)
        plan.refusals.append(_mismatch(ctx, plan, entry, key, obs, pin, data, boot))


def _mismatch(ctx, plan, entry, key, obs, pin, data, boot) -> DriveMismatchError:
    addr, vmid = obs.address, plan.vmid
    others = owners(data, obs, vmid)
    # Known only by its DSN: name it after the pin it matches, when there is one.
    now = (obs.describe() if obs.nvme or obs.recorded or not others
           else identity.describe(others[0][1]) + f" (by its PCIe Device Serial Number {obs.dsn})")
    if others:
        now += f", the pinned drive of {', '.join(o for o, _ in others)}"
    msg = f"{addr} now holds {now} (not VM {vmid}'s {identity.describe(pin['identity'])})"
    where = locate(ctx.root, pin["identity"], data, boot, skip=(addr,))
    accept = f"run `pvehook pin {vmid} --accept` to accept the drive at {addr}"
    alt_index = None
    if where and entry is not None and entry.mapping:
        alt_index = _alternative_of(ctx, entry, where[0])
    if not where:
        return DriveMismatchError(
            msg + "; that drive is not on this node (or on vfio-pci, where it cannot be"
                  " identified)", hint=f"put it back, or {accept}")
    there = ", ".join(map(str, where))
    if alt_index is not None:
        return DriveMismatchError(
            msg + f"; that drive is at {there}, alternative {alt_index} of mapping"
                  f" '{entry.mapping}', but qemu-server takes the first free alternative",
            hint=f"put that map line first in /etc/pve/mapping/pci.cfg (Datacenter > Resource"
                 f" Mappings), or {accept}")
    return DriveMismatchError(msg + f"; that drive is at {there}",
                              hint=f"update {key}, or {accept}")


def _alternative_of(ctx, entry, address) -> int | None:
    from .mapping import load_pci_mappings
    from .resolve import alternatives

    try:
        alts = alternatives(entry, [d.address for d in PciDevice.all(ctx.root)],
                            load_pci_mappings(ctx.root), ctx.node)
    except PvehookError:  # the mapping resolved a moment ago; this only words a message
        return None
    return next((i for i, alt in enumerate(alts, 1) if address in alt), None)


def commit(ctx, plan) -> None:
    """After a successful start: record what was read from nvme, pin what had no pin."""
    from .tasklog import log

    check = getattr(plan, "pins", None)
    if check is None or not (check.new_pins or any(o.nvme for o in check.observed)):
        return
    with PinStore(ctx.root).update() as data:
        record_seen(data, ctx.root, check.observed)
        entries = data["vms"].setdefault(str(plan.vmid), {})
        for key, obs in check.new_pins:
            entries.setdefault(key, []).append(pin_record(obs.address, obs.best, "first start"))
    for key, obs in check.new_pins:
        log.info("%s: pinned %s as the drive of VM %d %s (trust on first use: it was the drive"
                 " there at the first start; `pvehook pin %d` shows it)", obs.address,
                 obs.describe(), plan.vmid, key, plan.vmid)


# -- the CLI: pvehook pin, status, list, check, doctor ---------------------------------------

def _vm_plan(ctx, vmid: int):
    """Resolve a VM of this node as pre-start does and check its drives (no lock, no change)."""
    from .plan import choose, prepare

    plan = prepare(ctx, vmid, volumes=False)
    if plan.hostpci:
        choose(ctx, plan)
    check_pins(ctx, plan, plan.managed)
    return plan, plan.managed


def inspect_vm(ctx, vmid: int) -> dict:
    """Each drive the VM's hostpci entries give now, checked against its pins, and where
    each pinned drive is now."""
    plan, _managed = _vm_plan(ctx, vmid)
    store = PinStore(ctx.root)
    data = store.load()
    boot = boot_id(ctx.root)
    drives = []
    for r in plan.pins.results:
        drives.append({**r, "now_description": identity.describe(r["now"]),
                       "pinned_description": identity.describe(r["pinned"]) if r["pinned"] else None})
    given = {(d["key"], d["address"]) for d in drives}
    mapped = {e.key: e.mapping for e in plan.entries.values() if e.mapping}
    pinned = []
    for key, pins in sorted(data["vms"].get(str(vmid), {}).items()):
        for p in pins:
            where = [str(a) for a in locate(ctx.root, p["identity"], data, boot)]
            state = ("in place" if any((key, a) in given for a in where) else
                     "moved" if where else "missing")
            pinned.append({"key": key, "identity": p["identity"],
                           "description": identity.describe(p["identity"]),
                           "pinned_at": p["address"], "time": p["time"], "how": p["how"],
                           "now_at": where, "state": state, "mapping": mapped.get(key)})
    return {"vmid": vmid, "store": str(store.path), "lines": plan.lines, "drives": drives,
            "pinned": pinned,
            "refusals": [{"message": str(e), "exit_code": e.exit_code} for e in plan.refusals]}


def _record_pins(ctx, vmid: int, how: str, replace: bool) -> list[dict]:
    """Pin the drives the VM's entries give now: all of them (`replace`), or those of
    entries without a pin. Refuses before writing if one cannot be identified."""
    plan, _managed = _vm_plan(ctx, vmid)
    hard = [e for e in plan.refusals if not isinstance(e, DriveMismatchError)]
    if hard:
        raise hard[0]
    todo, skipped = [], []
    for r, obs in zip(plan.pins.results, plan.pins.observed):
        if not replace and r["verdict"] not in ("to pin", "cannot pin"):
            if r["verdict"] == "pinned for another VM":  # register: never on trust
                skipped.append({"key": r["key"], "address": str(obs.address),
                                "skipped": f"{obs.describe()} is another VM's pinned drive"})
            continue
        ident = obs.best
        if ident is None or not (ident.get("serial") or ident.get("dsn")):
            if not replace:  # register: that entry is pinned at the VM's first start
                skipped.append({"key": r["key"], "address": str(obs.address),
                                "skipped": obs.unknown_why()})
                continue
            raise DriveMismatchError(
                f"VM {vmid} {r['key']}: cannot pin the drive at {obs.address}: {obs.unknown_why()}",
                hint="let nvme take it once so its serial can be read, then try again")
        todo.append((r["key"], obs))
    done = []
    with PinStore(ctx.root).update() as data:
        record_seen(data, ctx.root, plan.pins.observed)
        old = data["vms"].get(str(vmid), {})
        entries = {} if replace else dict(old)
        for key, obs in todo:
            entries.setdefault(key, []).append(pin_record(obs.address, obs.best, how))
            was = [identity.describe(p["identity"]) for p in old.get(key, [])]
            done.append({"key": key, "address": str(obs.address), "identity": obs.best,
                         "description": obs.describe(), "was": was,
                         "also_pinned_for": [o for o, _ in owners(data, obs, vmid)]})
        if entries:
            data["vms"][str(vmid)] = entries
        else:
            data["vms"].pop(str(vmid), None)
    return done + skipped


def accept(ctx, vmid: int) -> list[dict]:
    """`pvehook pin <vmid> --accept`: the drives there now become the VM's pins."""
    return _record_pins(ctx, vmid, "accepted", replace=True)


def pin_new(ctx, vmid: int, how: str = "register") -> list[dict]:
    """Pin the drives of entries that have no pin yet (`pvehook register`)."""
    return _record_pins(ctx, vmid, how, replace=False)


def forget(ctx, vmid: int) -> list[dict]:
    """`pvehook pin <vmid> --forget`: drop the VM's pins; its next start pins again."""
    with PinStore(ctx.root).update() as data:
        old = data["vms"].pop(str(vmid), {})
    return [{"key": key, "address": p["address"], "identity": p["identity"],
             "description": identity.describe(p["identity"])}
            for key, pins in sorted(old.items()) for p in pins]


def drive_report(ctx, dev: PciDevice, data: dict, boot: str | None) -> dict:
    """`status`: the identity of one controller, how it was told, whose pinned drive it is."""
    obs = observe(ctx.root, dev, data, boot)
    source = ("nvme" if obs.nvme is not None else "recorded" if obs.recorded is not None
              else "dsn" if obs.dsn else None)
    return {"identity": obs.best, "identity_source": source,
            "recorded_at": obs.seen["time"] if source == "recorded" else None,
            "pinned_for": [o for o, _ in owners(data, obs)]}


def doctor_findings(ctx, vmids: list[int]) -> list[tuple[str, str, str | None]]:
    """(status, message, fix) for each registered VM of this node: are its pinned drives
    where its config sends the hook?"""
    out = []
    for vmid in vmids:
        try:
            info = inspect_vm(ctx, vmid)
        except (PvehookError, OSError) as e:  # a finding, never a crash of doctor
            if isinstance(e, PermissionError):
                raise
            out.append(("warn", f"VM {vmid}: cannot check its pinned drives: {e}", None))
            continue
        if not info["pinned"]:
            if info["drives"]:
                out.append(("info", f"VM {vmid}: no pinned drive yet (pinned at its next start)",
                            f"pvehook pin {vmid} --accept"))
            continue
        bad = False
        for p in info["pinned"]:
            if p["state"] == "moved":
                bad = True
                out.append(("error", f"VM {vmid} {p['key']}: its pinned drive {p['description']}"
                            f" moved to {', '.join(p['now_at'])} (pinned at {p['pinned_at']}):"
                            " the VM will not start",
                            (f"put its map line first in mapping '{p['mapping']}'" if p["mapping"]
                             else f"update {p['key']}")
                            + f", or `pvehook pin {vmid} --accept` for the drive there now"))
            elif p["state"] == "missing":
                bad = True
                out.append(("error", f"VM {vmid} {p['key']}: its pinned drive {p['description']}"
                            " is not on this node (or on vfio-pci and cannot be identified)",
                            f"put it back, or `pvehook pin {vmid} --accept`"))
        for d in info["drives"]:
            if d["verdict"] == "unverified":
                bad = True
                out.append(("warn", f"VM {vmid} {d['key']}: {d['address']} cannot be identified"
                            " (on vfio-pci without a PCIe Device Serial Number, not seen on nvme"
                            " in this boot)", "let nvme take it once"))
        if not bad:
            out.append(("ok", f"VM {vmid}: pinned drives in place ("
                        + ", ".join(f"{p['key']} {p['description']}" for p in info["pinned"]) + ")",
                        None))
    return out
