"""The host store directory: claims, liveness, and the names of its files.

Theory of operation
-------------------
A host store is one directory per host (per "co-location domain").  A server
that offers service ``NAME`` over vchan holds an exclusive ``flock`` on
``NAME.lock`` for as long as it serves, and listens on the Unix socket
``NAME.sock``.  A client connects to that socket and receives the shared
memory and event file descriptors (meshlink's vchan transport).  Beside them
a server may write ``NAME.meshlink.json``, its record (see
:mod:`resolver.hoststore.records`), and a disk server claims ``NAME.blk``.
Every file name of the store is built here and nowhere else.

Why a lock file as well as the socket: a server killed with SIGKILL leaves its
socket file behind, and a client connecting to it gets ``ECONNREFUSED`` -- but a
server starting up cannot tell "stale" from "someone else is binding right
now" by looking at the socket alone.  The kernel drops a dead process's
``flock`` for us, so "the lock is free" is exactly "no live server", with no
race: a new server that acquires the lock may remove whatever socket is
there, because no live process can own it.

Choosing the directory, in order: the ``path`` argument, the
``MESHLINK_HOST_STORE`` environment variable, ``$XDG_RUNTIME_DIR/meshlink``,
else ``/tmp/meshlink-<uid>``.  A directory we create is mode 0700; a default
directory that exists but is owned by another user or writable by others is
refused, so another local user cannot plant sockets in it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import NameInUse, StoreError
from ..names import NAME_RE, validate_service_name

__all__ = ["ENV_VAR", "HostStore", "Publication", "blk_entry_name"]

ENV_VAR = "MESHLINK_HOST_STORE"
_SOCKET, _LOCK, _RECORD, _BLK = ".sock", ".lock", ".meshlink.json", ".blk"


def blk_entry_name(service: str) -> str:
    """The host-store name under which ``service`` offers its disks on the blk ring.

    A disk server claims it like any service name (lock and socket), so one
    service may serve the bus and its disks side by side.
    """
    return f"{service}{_BLK}"


def _default_path() -> tuple[Path, bool]:
    """Return the store path and whether it is a default we must vet."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env), False
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "meshlink", True
    return Path("/tmp") / f"meshlink-{os.getuid()}", True


@dataclass
class Publication:
    """A service's claim on its name in a host store, held while serving.

    Attributes:
        service: the service name.
        socket_path: where the rendezvous socket must be bound.
    """

    service: str
    socket_path: Path
    _lock_fd: int
    _lock_path: Path

    def withdraw(self) -> None:
        """Remove the socket and lock files and release the claim.  Idempotent."""
        if self._lock_fd < 0:
            return
        # We still hold the lock, so both files are ours to remove.
        for p in (self.socket_path, self._lock_path):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        os.close(self._lock_fd)
        self._lock_fd = -1


class HostStore:
    """A per-host directory of co-located services.

    Args:
        path: the directory; default from ``MESHLINK_HOST_STORE``,
            ``$XDG_RUNTIME_DIR/meshlink`` or ``/tmp/meshlink-<uid>``.

    Raises:
        StoreError: the directory cannot be created, or a default
            directory is not private to this user.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        vet = False
        if path is None:
            p, vet = _default_path()
        else:
            p = Path(path)
        try:
            p.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = p.stat()
        except OSError as exc:
            raise StoreError(f"cannot use host store {p}: {exc}") from exc
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"host store {p} is not a directory")
        if vet and (st.st_uid != os.getuid() or st.st_mode & 0o022):
            raise StoreError(
                f"host store {p} is not private (owner uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):o}); set {ENV_VAR} to a directory you own"
            )
        self.path = p

    def __repr__(self) -> str:
        return f"HostStore({str(self.path)!r})"

    def socket_path(self, service: str) -> Path:
        """Path of the rendezvous socket of ``service``.

        Raises:
            InvalidName: ``service`` is not a valid service name.
        """
        return self.path / f"{validate_service_name(service)}{_SOCKET}"

    def record_path(self, service: str) -> Path:
        """Path of the record ``service`` publishes about itself (a JSON file).

        Raises:
            InvalidName: ``service`` is not a valid service name.
        """
        return self.path / f"{validate_service_name(service)}{_RECORD}"

    def _lock_path(self, service: str) -> Path:
        return self.path / f"{validate_service_name(service)}{_LOCK}"

    def claim(self, service: str) -> Publication:
        """Claim ``service`` for this process, clearing a crashed server's leftovers.

        Returns:
            A :class:`Publication`; bind the socket at ``socket_path`` and call
            :meth:`Publication.withdraw` when done.

        Raises:
            NameInUse: a live server already holds the name.
            InvalidName: ``service`` is not a valid service name.
        """
        lock_path = self._lock_path(service)
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise NameInUse(
                    errno.EADDRINUSE, f"service {service!r} is already served in {self.path}"
                ) from None
            # The file we locked may have been unlinked by a server that was
            # withdrawing; only a lock on the file at the path counts.
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        sock_path = self.socket_path(service)
        try:
            sock_path.unlink()  # stale: no live server holds the lock
        except FileNotFoundError:
            pass
        return Publication(service, sock_path, fd, lock_path)

    def is_live(self, service: str) -> bool:
        """Whether a live server currently holds ``service`` (lock held)."""
        try:
            fd = os.open(self._lock_path(service), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def services(self) -> Iterator[tuple[str, bool]]:
        """Yield ``(name, live)`` for every entry in the store, sorted by name."""
        names = sorted(
            {p.stem for p in self.path.iterdir() if p.suffix in (_SOCKET, _LOCK)}
        )
        for name in names:
            if NAME_RE.match(name):
                yield name, self.is_live(name)
