"""Boots TCG guests that run the static ivshmem peer, for tests and the bench.

A guest is QEMU (``qemu-system-x86_64``, TCG: no KVM needed) with the host's
Debian kernel, an initramfs generated here (busybox, the static peer, the
e1000 module for the networking baseline) and an ``ivshmem-plain`` device
backed by a host file (``memory-backend-file,share=on``).  The guest's init
runs the commands given on the kernel command line (``ivscmd=``: commands
separated by ``+``, arguments by ``,``), one after the other, each being
``ivshmem_peer`` with those arguments, then powers off.  Everything the peer
prints reaches us on the serial console, line by line.
"""

from __future__ import annotations

import glob
import os
import platform
import queue
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

from .ivshmem_build import build_peer

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
if [ -f /e1000.ko ] && insmod /e1000.ko 2>/dev/null; then
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
fi
echo IVSGUEST UP
for word in $(cat /proc/cmdline); do
    case "$word" in ivscmd=*) cmds="${word#ivscmd=}";; esac
done
IFS=+
for cmd in $cmds; do
    IFS=,
    set -- $cmd
    IFS=+
    /ivshmem_peer "$@"
    echo "IVSPEER EXIT $?"
done
echo IVSGUEST DONE
poweroff -f
"""


def kernel_image() -> str | None:
    """The newest readable kernel image under /boot, or None."""
    images = sorted(glob.glob("/boot/vmlinuz-*"))
    images = [p for p in images if os.access(p, os.R_OK)]
    return images[-1] if images else None


def missing() -> str | None:
    """Why guests cannot boot here (None when they can)."""
    if platform.machine() != "x86_64":
        return "guest boot tests need an x86_64 host"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed (Debian: qemu-system-x86)"
    if shutil.which("busybox") is None or not _is_static(shutil.which("busybox") or ""):
        return "a static busybox is not installed (Debian: busybox-static)"
    if kernel_image() is None:
        return "no readable kernel in /boot (Debian: linux-image-amd64)"
    if shutil.which("gcc") is None:
        return "gcc not installed"
    return None


def _is_static(path: str) -> bool:
    try:
        out = subprocess.run(["file", "-L", path], capture_output=True, text=True).stdout
    except FileNotFoundError:
        # No `file`: a static binary has no PT_INTERP, so it has no ".interp" string.
        return b"/lib64/ld-linux" not in Path(path).read_bytes()[:4096]
    return "statically linked" in out or "static-pie" in out


def _cpio_entry(name: str, mode: int, data: bytes, ino: int) -> bytes:
    """One entry of a newc cpio archive (what the kernel unpacks as initramfs)."""
    namez = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + namez
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def make_initramfs(out: Path, peer: Path) -> Path:
    """Write an initramfs with busybox, the peer, init and (if found) e1000.ko."""
    busybox = Path(shutil.which("busybox") or "busybox").read_bytes()
    parts = []
    ino = 1
    for d in ("bin", "proc", "sys", "dev"):
        parts.append(_cpio_entry(d, stat.S_IFDIR | 0o755, b"", ino))
        ino += 1
    files = {"bin/busybox": busybox, "init": INIT.encode(), "ivshmem_peer": peer.read_bytes()}
    kernel = kernel_image() or ""
    release = kernel.split("vmlinuz-", 1)[-1]
    e1000 = glob.glob(f"/lib/modules/{release}/kernel/drivers/net/ethernet/intel/e1000/e1000.ko")
    if e1000:
        files["e1000.ko"] = Path(e1000[0]).read_bytes()
    for name, data in files.items():
        parts.append(_cpio_entry(name, stat.S_IFREG | 0o755, data, ino))
        ino += 1
    parts.append(_cpio_entry("TRAILER!!!", 0, b"", 0))
    out.write_bytes(b"".join(parts))
    return out


def build_guest_files(workdir: Path) -> Path:
    """Build the static peer and the initramfs in ``workdir``; returns the initramfs."""
    peer = build_peer(workdir / "ivshmem_peer", static=True)
    return make_initramfs(workdir / "initramfs.cpio", peer)


class Guest:
    """One TCG guest with an ivshmem region; its console is read line by line.

    Args:
        initramfs: from :func:`build_guest_files`.
        region: the host file shared as the ivshmem BAR (must exist, full size).
        commands: peer command lines, each a list of arguments.
        net_port: forward nothing, but give the guest an e1000 NIC on user-mode
            networking (the host is 10.0.2.2 from inside).
    """

    def __init__(self, initramfs: Path, region: Path, commands: list[list[str]], *,
                 net: bool = False, memory: str = "256M") -> None:
        size = region.stat().st_size
        cmd = "+".join(",".join(c) for c in commands)
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none",
            "-no-reboot", "-m", memory, "-serial", "stdio", "-monitor", "none",
            "-kernel", kernel_image() or "", "-initrd", str(initramfs),
            "-append", f"console=ttyS0 quiet loglevel=1 panic=-1 ivscmd={cmd}",
            "-object", f"memory-backend-file,id=ivs,mem-path={region},size={size},share=on",
            "-device", "ivshmem-plain,memdev=ivs",
        ]
        if net:
            argv += ["-netdev", "user,id=n0", "-device", "e1000,netdev=n0"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            self.log.append(line)
            self.lines.put(line)
        self.lines.put("")  # EOF marker

    def expect(self, prefix: str, timeout: float = 120) -> str:
        """Wait for a console line starting with ``prefix``; returns it.

        Raises:
            AssertionError: the guest exited or ``timeout`` passed first (the
                console so far is in the message).
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(left, 0.01))
            except queue.Empty:
                line = None
            if line is None or (line == "" and self.proc.poll() is not None):
                tail = "\n".join(self.log[-30:])
                raise AssertionError(f"guest did not print {prefix!r}; console:\n{tail}")
            if line.startswith(prefix):
                return line

    def kill(self) -> None:
        """SIGKILL the guest (as a crash would) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def wait(self, timeout: float = 60) -> int:
        """Wait for the guest to power off; returns QEMU's exit status."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
