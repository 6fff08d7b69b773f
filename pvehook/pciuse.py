"""What the host has on a PCI function that qemu-server will bind to vfio-pci.

Whatever the function is (NVMe, SATA/AHCI, SAS/RAID, USB, NIC, GPU), the host loses it to
the VM. It refuses when it loses a disk in use (the same checks as for the NVMe
controllers the hook moves: usage.host_use) or a configured network interface
(netif.host_use); anything else (a GPU's HDMI audio function, an idle controller) is
named in a line and goes.
"""

from __future__ import annotations

import errno

from .block import BlockDevice, namespaces
from .context import Context
from .netif import host_use as net_use
from .netif import interfaces_under
from .paths import Root
from .pci import PciDevice, class_devices_under
from .usage import host_use as disk_use


def disks_under(root: Root, dev: PciDevice) -> list[BlockDevice]:
    """The whole disks behind a PCI function: an NVMe controller's namespaces (a native
    multipath head included), else every disk whose sysfs directory lies under the
    function's (ata1/host0/target0:0:0/0:0:0:0/block/sda, usb1/1-1/.../block/sdb,
    virtio0/block/vda, mmc_host/.../block/mmcblk0)."""
    if dev.is_nvme:
        return namespaces(dev)
    out = []
    for name, path in class_devices_under(root, "block", dev.sys_path):
        if not (path / "partition").exists() and (path / "dev").exists():
            out.append(BlockDevice.by_name(root, name))
    return out


class FunctionUse:
    def __init__(self) -> None:
        self.reasons: list[str] = []  # the host uses it: refuse
        self.notes: list[str] = []  # on it, not in use
        self.disks: list[str] = []
        self.netifs: list[str] = []


def host_use(ctx: Context, dev: PciDevice, openers=None) -> FunctionUse:
    """`openers`: the run's one scan of /proc (None: scan here), see usage.host_use."""
    use = FunctionUse()
    disks = disks_under(ctx.root, dev)
    use.disks = [d.name for d in disks]
    for disk in disks:  # one at a time: an empty drive fails the open probe by itself
        try:
            du = disk_use(ctx.root, ctx.kernel, [disk], openers)
        except OSError as e:
            if e.errno == errno.ENOMEDIUM:  # a CD/DVD or card reader without a medium
                use.notes.append(f"{disk.name} has no medium")
            else:  # cannot tell: refuse rather than take it
                use.reasons.append(f"cannot check whether the host uses {disk.name}:"
                                   f" {e.strerror or e}")
            continue
        use.reasons += du.reasons
        use.notes += du.notes
    nifs = interfaces_under(ctx.root, dev.sys_path)
    use.netifs = [n.name for n in nifs]
    nu = net_use(ctx.root, ctx.kernel, nifs)
    use.reasons += nu.reasons
    use.notes += nu.notes
    return use
