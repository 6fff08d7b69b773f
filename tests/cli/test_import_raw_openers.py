"""import-raw refuses a source disk that a process (a running VM's QEMU) has open."""

from __future__ import annotations

from fakesys import FakeNamespace

A = "0000:01:00.0"
STORAGE = """\
lvmthin: local-lvm
\tthinpool data
\tvgname pve
\tcontent rootdir,images
"""


def test_refuses_a_disk_open_by_a_running_vm(cluster, cli):
    cluster.storage(STORAGE)
    cluster.vm(100, "memory: 2048\nname: target\n")
    cluster.vm(300, "memory: 512\nscsi1: /dev/nvme0n1\n")
    host = cluster.host
    host.add_pci(A, group=1, serial="SA", namespaces=[FakeNamespace(partitions=1)])
    host.root.dev("nvme0n1").write_bytes(b"\0" * 4096)
    host.open_file(4242, "/dev/nvme0n1", comm="kvm", cmdline=["/usr/bin/kvm", "-id", "300"])
    host.qemu_pidfile(300, 4242)

    code, out, err = cli("import-raw", 100, "/dev/nvme0n1", "local-lvm")
    assert code == 11, err
    assert ("the host uses /dev/nvme0n1: nvme0n1 is open by pid 4242 (kvm), the QEMU of"
            " running VM 300") in err
    assert cluster.writes() == [] and "scsi0" not in cluster.conf(100)

    host.exit_process(4242)
    host.root.run("qemu-server", "300.pid").unlink()
    code, out, err = cli("import-raw", 100, "/dev/nvme0n1", "local-lvm", "--dry-run")
    assert code == 0, err
    assert ("warning: VM 300 (not running) has nvme0n1 by path in its config"
            " (scsi1: /dev/nvme0n1)") in out + err


def test_status_names_the_opener_and_the_config(node, cli):
    node.add_pci(A, group=1, serial="SA", namespaces=[FakeNamespace(partitions=1)])
    node.vm_config(300, "memory: 512\nscsi1: /dev/nvme0n1p1\n")
    node.open_file(555, "/dev/nvme0n1", comm="dd")
    code, out, err = cli("status")
    assert code == 0, err
    assert "  nvme0n1 (256 MiB): nvme0n1 is open by pid 555 (dd)\n" in out
    assert ("    warning: VM 300 (not running) has nvme0n1p1 by path in its config"
            " (scsi1: /dev/nvme0n1p1)") in out
