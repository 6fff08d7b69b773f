"""Boot the guest and show the hook's lifecycle (run through tests/vm/demo.sh)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Topology, run_guest  # noqa: E402

SCRIPT = r"""
set -u
show() { echo; echo "\$ $*"; eval "$@"; }
modprobe nvme; udevadm settle
A=$VM_BDF_DISK_A B=$VM_BDF_DISK_B
mkdir -p /etc/pve/qemu-server
printf 'memory: 4096\nmachine: q35\nhostpci0: %s,pcie=1\nscsi0: local-lvm:vm-100-disk-0,size=32G\n' "$A" \
    > /etc/pve/qemu-server/100.conf
printf 'pvehook demo %s' "$(date)" | dd of=$(vm_nvme_disk DISK_A) bs=512 seek=2048 conv=sync status=none
echo "Two identical NVMe controllers (1b36:0010): DISK_A at $A, DISK_B at $B."
show "lspci -nn -s ${A#0000:}; lspci -nn -s ${B#0000:}"
show "cat /etc/pve/qemu-server/100.conf"
show "/src/hooks/pvehook-hook 100 pre-start; echo exit code \$?"
show "echo \"$A: \$(vm_driver $A)   $B (its twin): \$(vm_driver $B)\""
echo; echo "# What Proxmox does next: QEMU opens the device through VFIO."
show "vm_vfio_open $A >/dev/null && echo 'nested QEMU realized vfio-pci,host=$A'"
show "/src/hooks/pvehook-hook 100 post-stop; echo exit code \$?"
show "echo \"$A: \$(vm_driver $A)\"; lsblk -o NAME,SERIAL,SIZE \$(vm_nvme_disk DISK_A)"
show "dd if=\$(vm_nvme_disk DISK_A) bs=512 skip=2048 count=1 status=none | tr -d '\\0'; echo"
"""


def main() -> int:
    topo = Topology().isolated_nvme("DISK_A").isolated_nvme("DISK_B")
    print("== booting Debian trixie's kernel under QEMU (q35, intel-iommu, TCG) ==")
    res = run_guest(SCRIPT, topo, timeout=300)
    print(res.output)
    print(f"== guest run took {res.duration:.1f} s; console log: {res.console_log} ==")
    return res.exit_code


if __name__ == "__main__":
    sys.exit(main())
