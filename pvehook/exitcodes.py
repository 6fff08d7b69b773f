"""Every exit code of the hook and of `pvehook`, in one table.

The error classes take their codes from here, `pvehook --help` (and so the man page) is
generated from it, and a test checks the README's two tables against it. A code means
one thing wherever it appears; `hook` says what it means when the hookscript exits with
it (None: the hook never does), `cli` what it means for `pvehook` (None: never).
Plain tuples: the hook imports this at every start.
"""

OK = 0
ERROR = 1
USAGE = 2
NO_DEVICE = 3
NOT_ROOT = 4
NOT_PROXMOX = 5
NO_VM = 6
STORAGE = 7
HOOKSCRIPT_CONFLICT = 8
NOT_READY = 9
IOMMU = 10
IN_USE = 11
HELD = 12
BIND = 13
GIVE_BACK = 14
VOLUME = 15
VM_BUSY = 16
IMAGE_HEADER = 17
NOT_PINNED = 18

# (code, hook meaning, pvehook meaning)
TABLE = (
    (OK, "done, or nothing to do",
     "done; `doctor`: the node is ready; `check`: the hook would start the VM"),
    (ERROR, "the VM config is missing or unreadable/malformed, qemu-server would refuse it"
            " (`pcie=1` without q35, legacy-igd rules, a `hostpciN` it would drop), a pvehook"
            " record cannot be read, `/run/pvehook` (or its `locks`) is not root's alone (a"
            " link, another owner: remove it, as the message says), or an unexpected error",
     "error: a Proxmox API error, an unreadable or malformed config"),
    (USAGE, "usage: missing arguments or a malformed vmid", "bad usage"),
    (NO_DEVICE, "a `hostpci` id or mapping names no device on this node, or a mapping does"
                " not match the device at its path (hardware changed)",
     "`check`, `reserve`: a `hostpci` id or mapping names no device on this node"),
    (NOT_ROOT, None, "not root"),
    (NOT_PROXMOX, None,
     "not a Proxmox VE node (no `pvesh`/`pvesm`, or proxmoxer without the local backend)"),
    (NO_VM, None, "the VM does not exist (or is a container)"),
    (STORAGE, None,
     "storage: missing, not a directory storage, or without `snippets` content;"
     " import-raw: not lvm/lvmthin, without `images`, not on this node"),
    (HOOKSCRIPT_CONFLICT, None, "the VM already has another hookscript (use `--force`)"),
    (NOT_READY, None, "`doctor`: the node is not ready"),
    (IOMMU, "IOMMU off, or a device without an IOMMU group",
     "`check`, `reserve`: the hook would refuse: IOMMU off, or a device without an IOMMU"
     " group"),
    (IN_USE, "the host uses the disk (mounted, swap, held, opened exclusively, system disk),"
             " a disk or configured network interface on a device the VM's IOMMU groups take,"
             " an NVMe controller on another host driver, or a multipath namespace through a"
             " controller that stays",
     "`check`, `reserve`: the hook would refuse: the host uses the disk; import-raw: the"
     " host uses the source disk"),
    (HELD, "another running VM holds the device or a member of its IOMMU group (or another"
           " pvehook run, or `pvehook import-raw` copying its disk, has it locked)",
     "`check`, `reserve`: the hook would refuse: another running VM holds the device, or it"
     " is locked; import-raw: a VM starting or stopping holds the source controller's lock"),
    (BIND, "a driver did not release or take a device, or not within its deadline;"
           " every device was given back",
     "`reserve`: a driver did not release or take a device; every device was given back"),
    (GIVE_BACK, "post-stop could not give every device back (each one is reported)",
     "release: a device could not be given back (each one is reported)"),
    (VOLUME, "an LVM volume of the VM cannot be confirmed as a RAW volume",
     "`check`: the hook would refuse: an LVM volume is not a confirmed RAW volume"),
    (VM_BUSY, None, "import-raw: the VM is running, locked, or on another node; release: the"
                    " VM is running, or a Proxmox task holds its lock"),
    (IMAGE_HEADER, None,
     "import-raw: the source starts with a disk-image or LUKS header (qemu-img would not"
     " copy it raw), or its first sector cannot be read"),
    (NOT_PINNED, "a drive at a `hostpci` address is not the one pinned for the VM (or cannot be"
                 " identified); nothing was moved",
     "`check`: a drive is not the one pinned for the VM; `pin --accept`: a drive cannot be"
     " identified"),
)


def hook_codes() -> list[tuple[int, str]]:
    return [(code, hook) for code, hook, _cli in TABLE if hook is not None]


def cli_codes() -> list[tuple[int, str]]:
    return [(code, cli) for code, _hook, cli in TABLE if cli is not None]


def _plain(text: str) -> str:
    return text.replace("`", "")


def help_text() -> str:
    """The "Exit codes:" block of `pvehook --help` (click's \\b keeps its layout)."""
    import textwrap  # the CLI only

    lines = ["\b", "Exit codes:"]
    for code, meaning in cli_codes():
        lines += textwrap.wrap(_plain(meaning), 78, initial_indent=f"  {code:<3} ",
                               subsequent_indent=" " * 6, break_on_hyphens=False)
    return "\n".join(lines)


def markdown(which: str) -> str:
    """The README's table of the hook's ("hook") or pvehook's ("cli") exit codes."""
    rows = hook_codes() if which == "hook" else cli_codes()
    return "\n".join(["| code | meaning |", "|---|---|",
                      *(f"| {code} | {meaning} |" for code, meaning in rows)])


def summary(pairs) -> str:
    """`Exit codes: 0 done; 11 the host uses it; ...` for a command's own epilog (a \\b
    paragraph): the numbers come from the table's names, the words are the command's."""
    import textwrap

    text = "Exit codes: " + "; ".join(f"{code} {words}" for code, words in pairs) + "."
    return "\n".join(textwrap.wrap(text, 80, break_on_hyphens=False))
