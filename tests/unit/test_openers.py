"""A disk open by a process (another VM's QEMU, a dd) is in use: pre-start refuses it.

QEMU opens a disk given by path without O_EXCL, so only the processes' open files show
it (/proc/<pid>/fd, faked here as the kernel shows them: symlinks to /dev/<name>).
"""

from __future__ import annotations


from fakesys import nvme, record

A = "0000:01:00.0"


def unchanged(host):
    assert host.driver_of(A) == "nvme"
    assert host.namespaces_of(A) == ["nvme0n1", "nvme0n1p1", "nvme0n1p2"]
    assert record(host, 101) is None


def test_another_vms_qemu_holding_the_namespace_refuses(host, hook):
    nvme(host)
    host.vm_config(300, "memory: 512\nscsi1: /dev/nvme0n1,size=256M\n")
    host.vm_config(101, f"hostpci0: {A}\n")
    host.open_file(4242, "/dev/nvme0n1", comm="kvm",
                   cmdline=["/usr/bin/kvm", "-id", "300", "-name", "vm300,debug-threads=on"])
    host.qemu_pidfile(300, 4242)

    code, out = hook(101, "pre-start")
    assert code == 11, out
    assert "nvme0n1 is open by pid 4242 (kvm), the QEMU of running VM 300" in out
    assert "stop VM 300" in out
    assert "VM 101 not started" in out
    unchanged(host)

    host.exit_process(4242)  # VM 300 stops
    host.root.run("qemu-server", "300.pid").unlink()
    code, out = hook(101, "pre-start")
    assert code == 0, out
    assert host.driver_of(A) == "vfio-pci"
    # Its config still names the disk: a warning, not a refusal.
    assert (f"{A}: warning: VM 300 (not running) has nvme0n1 by path in its config"
            " (scsi1: /dev/nvme0n1)") in out


def test_qemu_known_by_its_command_line_without_pid_file(host, hook):
    nvme(host)
    host.vm_config(101, f"hostpci0: {A}\n")
    host.open_file(77, "socket:[991]", comm="kvm")
    host.open_file(77, "/dev/nvme0n1p2", comm="kvm", cmdline=["/usr/bin/kvm", "-id", "300"])
    code, out = hook(101, "pre-start")
    assert code == 11, out
    assert "nvme0n1p2 is open by pid 77 (kvm), the QEMU of running VM 300" in out
    unchanged(host)


def test_any_process_holding_a_partition_refuses(host, hook):
    nvme(host)
    host.vm_config(101, f"hostpci0: {A}\n")
    host.open_file(555, "/dev/nvme0n1p1", comm="dd")
    code, out = hook(101, "pre-start")
    assert code == 11, out
    assert "nvme0n1p1 is open by pid 555 (dd)" in out
    assert "the QEMU of" not in out  # a dd, not a VM's QEMU
    unchanged(host)


def test_an_opener_of_a_device_stacked_on_it_is_named(host, hook):
    nvme(host)
    host.hold("nvme0n1p1", holder="dm-0", dm_name="vg0-data", uuid="LVM-xyz")
    host.vm_config(101, f"hostpci0: {A}\n")
    host.open_file(900, "/dev/dm-0", comm="kvm", cmdline=["kvm", "-id", "250"])
    code, out = hook(101, "pre-start")
    assert code == 11, out
    assert ("nvme0n1p1 is open through dm-0 (vg0-data) by pid 900 (kvm), the QEMU of running"
            " VM 250") in out
    unchanged(host)


def test_other_open_files_do_not_count(host, hook):
    nvme(host)
    host.vm_config(101, f"hostpci0: {A}\n")
    for target in ("/dev/null", "/dev/pts/0", "/dev/shm/x", "/var/log/syslog", "pipe:[12]",
                   "anon_inode:[eventfd]", "/dev/nvme0", "/dev/vfio/7", "/dev/nvme9n1"):
        host.open_file(600, target, comm="busy")
    code, out = hook(101, "pre-start")
    assert code == 0, out
    assert host.driver_of(A) == "vfio-pci"


def test_configs_naming_the_disk_by_path_warn(host, hook):
    nvme(host)
    byid = host.root.dev("disk/by-id/nvme-QEMU_NVMe_Ctrl_S1")
    byid.parent.mkdir(parents=True)
    byid.symlink_to("../../nvme0n1")
    host.vm_config(101, f"hostpci0: {A}\n")
    host.vm_config(200, "sata0: /dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_S1,backup=0\n")
    host.vm_config(201, "virtio2: file=/dev/nvme0n1p2\n")
    host.vm_config(202, "scsi0: local-lvm:vm-202-disk-0\nscsi1: /dev/sdb\n")
    # Only the main section is what a start uses.
    host.vm_config(203, "memory: 512\n[snap1]\nscsi1: /dev/nvme0n1\n")
    code, out = hook(101, "pre-start")
    assert code == 0, out
    assert ("warning: VM 200 (not running) has nvme0n1 by path in its config"
            " (sata0: /dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_S1)") in out
    assert "warning: VM 201 (not running) has nvme0n1p2 by path in its config" in out
    assert "VM 202" not in out and "VM 203" not in out
    assert host.driver_of(A) == "vfio-pci"


def test_status_shows_the_opener(host, ctx):
    from pvehook.cli.status import status_data

    nvme(host)
    host.open_file(4242, "/dev/nvme0n1", comm="kvm", cmdline=["kvm", "-id", "300"])
    host.qemu_pidfile(300, 4242)
    [item] = status_data(ctx)
    [ns] = item["namespaces"]
    assert ns["host_use"] == ["nvme0n1 is open by pid 4242 (kvm), the QEMU of running VM 300:"
                              " stop VM 300 or remove the disk from it first"]


def test_every_controller_of_the_vm_is_checked_against_one_scan(host, hook):
    B = "0000:02:00.0"
    nvme(host)
    nvme(host, B, group=2, partitions=0)
    host.vm_config(101, f"hostpci0: {A}\nhostpci1: {B}\n")
    host.open_file(4242, "/dev/nvme0n1p1", comm="kvm", cmdline=["kvm", "-id", "300"])
    host.open_file(555, "/dev/nvme1n1", comm="dd")
    code, out = hook(101, "pre-start")
    assert code == 11, out
    assert f"{A}: the host uses this disk: nvme0n1p1 is open by pid 4242 (kvm)" in out
    assert f"{B}: the host uses this disk: nvme1n1 is open by pid 555 (dd)" in out
    assert host.driver_of(A) == host.driver_of(B) == "nvme"


def test_a_qemu_of_no_vm_is_named_by_its_name(host, hook):
    nvme(host)
    host.vm_config(101, f"hostpci0: {A}\n")
    host.open_file(77, "/dev/nvme0n1", comm="qemu-system-x86",
                   cmdline=["qemu-system-x86_64", "-name", "guest=guest7,debug-threads=on",
                            "-drive", "file=/dev/nvme0n1,format=raw"])
    code, out = hook(101, "pre-start")
    assert code == 11, out
    assert "nvme0n1 is open by pid 77 (qemu-system-x86), a QEMU named 'guest7'" in out
    unchanged(host)


def test_a_reader_that_closes_within_the_grace_is_not_a_holder(host, ctx):
    """udev's blkid or an LVM label scan opens a disk for milliseconds."""
    from pvehook.block import BlockDevice
    from pvehook.openers import Openers
    from pvehook.usage import host_use

    nvme(host)
    disk = BlockDevice.by_name(host.root, "nvme0n1")
    host.open_file(31, "/dev/nvme0n1", comm="(udev-worker)")
    host.open_file(32, "/dev/nvme0n1p1", comm="vgs")
    waits = []

    def sleep(s):  # the scan waits; meanwhile both readers are done
        waits.append(s)
        host.exit_process(31)
        host.exit_process(32)

    use = host_use(host.root, ctx.kernel, [disk], Openers(host.root, grace=60, sleep=sleep))
    assert use.reasons == []
    assert waits  # it did find them first

    # A holder that stays is refused once the grace is over.
    host.open_file(33, "/dev/nvme0n1p2", comm="dd")
    use = host_use(host.root, ctx.kernel, [disk], Openers(host.root, grace=0.2))
    assert use.reasons == ["nvme0n1p2 is open by pid 33 (dd)"]


def test_a_loop_device_over_the_namespace_refuses(host, hook):
    """`losetup /dev/loop0 /dev/nvme0n1`: the loop driver holds the namespace in the
    kernel; no process's fd and no holders/ link shows it, only loop's backing_file."""
    nvme(host)
    host.vm_config(101, f"hostpci0: {A}\n")
    name = host.namespaces_of(A)[0]
    loop = host.root.sys("block", "loop0", "loop")
    loop.mkdir(parents=True)
    (loop / "backing_file").write_text(f"/dev/{name}\n")
    code, out = hook(101, "pre-start")
    assert code == 11, out
    assert f"{name} backs the loop device loop0" in out
    unchanged(host)
    (loop / "backing_file").unlink()  # losetup -d
    assert hook(101, "pre-start")[0] == 0
