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
else ``/tmp/meshlink-<uid>``.

*Who may write here.*  Whoever can write in the directory can impersonate
every service in it, so every store, explicit or default, must be a real
directory (a symlink is refused, never followed) owned by us and writable by
nobody else.  A store shared by a group is opt-in (``group=`` or
``MESHLINK_HOST_STORE_GROUP``): then it must belong to that group, be owned by
us or root, and not be writable by others.  The directory is opened once
(``O_NOFOLLOW``) and kept open; every entry is then created, opened, renamed
and removed relative to that descriptor with ``O_NOFOLLOW`` / ``O_EXCL``, so a
symlink planted under an entry's name can never redirect a write, and a
server removes only the files it created (same device and inode).
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import stat
import weakref
from collections.abc import Iterator
from pathlib import Path

from ..errors import NameInUse, StoreError
from ..names import NAME_RE, validate_service_name

__all__ = ["ENV_VAR", "GROUP_ENV_VAR", "HostStore", "Publication", "blk_entry_name",
           "default_store_path"]

ENV_VAR = "MESHLINK_HOST_STORE"
GROUP_ENV_VAR = "MESHLINK_HOST_STORE_GROUP"
_SOCKET, _LOCK, _RECORD, _BLK = ".sock", ".lock", ".meshlink.json", ".blk"
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Flags of every entry we open: never through a symlink, never a tty, never
#: blocking on a planted FIFO.
_ENTRY = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def blk_entry_name(service: str) -> str:
    """The host-store name under which ``service`` offers its disks on the blk ring.

    A disk server claims it like any service name (lock and socket), so one
    service may serve the bus and its disks side by side.
    """
    return f"{service}{_BLK}"


def default_store_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The directory a :class:`HostStore` made with ``path`` would use (no side effect)."""
    if path is not None:
        return Path(path)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "meshlink"
    return Path("/tmp") / f"meshlink-{os.getuid()}"


def _group_id(group: str | int | None) -> int | None:
    if group is None:
        env = os.environ.get(GROUP_ENV_VAR)
        if not env:
            return None
        group = env
    if isinstance(group, int):
        return group
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise StoreError(f"host store group {group!r} does not exist") from None


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class Publication:
    """A service's claim on its name in a host store, held while serving.

    Attributes:
        service: the service name.
        socket_path: where the rendezvous socket lives (for messages).
        bind_path: the path to bind the socket at: the same entry, reached
            through the store's open directory descriptor
            (``/proc/self/fd/N/NAME.sock``) so that a renamed or replaced
            directory cannot redirect it.
    """

    # A plain class, not a dataclass: `meshlink disk serve` loads this module
    # before it is ready, and the dataclasses module alone costs it ~5 ms.
    __slots__ = ("service", "socket_path", "bind_path", "_store", "_lock_fd", "_lock_name",
                 "_sock_name", "_lock_id", "_sock_id")

    def __init__(self, service: str, socket_path: Path, bind_path: str, store: HostStore,
                 lock_fd: int, lock_name: str, sock_name: str,
                 lock_id: tuple[int, int]) -> None:
        self.service = service
        self.socket_path = socket_path
        self.bind_path = bind_path
        self._store = store
        self._lock_fd = lock_fd
        self._lock_name = lock_name
        self._sock_name = sock_name
        self._lock_id = lock_id
        self._sock_id: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"Publication(service={self.service!r}, socket_path={str(self.socket_path)!r})"

    def bound(self) -> None:
        """Record the socket just bound at ``bind_path`` as ours (call right after ``bind``)."""
        st = os.stat(self._sock_name, dir_fd=self._store.dir_fd, follow_symlinks=False)
        self._sock_id = _identity(st)
        if self._store.group is not None:
            # Group members must be able to connect: rw for the group.
            os.chmod(self.bind_path, 0o660)

    def withdraw(self) -> None:
        """Remove our socket and lock files and release the claim.  Idempotent.

        Only files this claim created are removed: if another server has
        meanwhile replaced an entry (its lock or socket file was removed
        behind our back), the newcomer's files stay.
        """
        if self._lock_fd < 0:
            return
        if self._sock_id is not None:
            self._store._unlink_if(self._sock_name, self._sock_id)
        self._store._unlink_if(self._lock_name, self._lock_id)
        os.close(self._lock_fd)
        self._lock_fd = -1


class HostStore:
    """A per-host directory of co-located services.

    Args:
        path: the directory; default from ``MESHLINK_HOST_STORE``,
            ``$XDG_RUNTIME_DIR/meshlink`` or ``/tmp/meshlink-<uid>``.
        group: share the store with this group (name or gid; default
            ``$MESHLINK_HOST_STORE_GROUP``, else private to this user).
        create: create the directory if it is missing (``False``: a missing
            directory is a :class:`StoreError`).

    Raises:
        StoreError: the directory cannot be created or opened, is a symlink,
            or may be written by someone it should not (see the module notes).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 group: str | int | None = None, create: bool = True) -> None:
        p = default_store_path(path)
        gid = _group_id(group)
        if create:
            self._create(p, gid, explicit=path is not None or bool(os.environ.get(ENV_VAR)))
        try:
            fd = os.open(p, _OPEN_DIR)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise StoreError(f"host store {p} is a symlink or not a directory; "
                                 "it is refused, never followed") from exc
            raise StoreError(f"cannot use host store {p}: {exc}") from exc
        try:
            self._vet(p, os.fstat(fd), gid)
        except BaseException:
            os.close(fd)
            raise
        self.path = p
        self.group = gid
        self.dir_fd = fd
        self._owned: dict[str, tuple[int, int]] = {}
        self._finalizer = weakref.finalize(self, os.close, fd)

    @classmethod
    def of(cls, store: HostStore | str | os.PathLike[str] | None) -> HostStore:
        """``store`` itself if it is a :class:`HostStore`, else the store at
        that directory (default: see the module notes).  What every API that
        takes ``host_store=`` does with it."""
        return store if isinstance(store, HostStore) else cls(store)

    @staticmethod
    def _create(p: Path, gid: int | None, explicit: bool) -> None:
        if explicit:
            try:
                p.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot use host store {p}: {exc}") from exc
        try:
            os.mkdir(p, 0o700 if gid is None else 0o770)
        except FileExistsError:
            return  # vetted after opening, whatever it is
        except OSError as exc:
            raise StoreError(f"cannot use host store {p}: {exc}") from exc
        if gid is not None:
            try:
                os.chown(p, -1, gid, follow_symlinks=False)
                os.chmod(p, 0o2770, follow_symlinks=False)
            except OSError as exc:
                raise StoreError(f"cannot give host store {p} to group {gid}: {exc}") from exc

    @staticmethod
    def _vet(p: Path, st: os.stat_result, gid: int | None) -> None:
        mode = stat.S_IMODE(st.st_mode)
        if gid is None:
            if st.st_uid != os.getuid() or mode & 0o022:
                raise StoreError(
                    f"host store {p} is not private (owner uid {st.st_uid}, mode {mode:o}): "
                    f"it must be owned by uid {os.getuid()} and not writable by group or "
                    f"others; use a directory you own, or share it on purpose with "
                    f"{GROUP_ENV_VAR}"
                )
        elif st.st_uid not in (os.getuid(), 0) or st.st_gid != gid or mode & 0o002:
            raise StoreError(
                f"host store {p} is not safe for group {gid} (owner uid {st.st_uid}, group "
                f"{st.st_gid}, mode {mode:o}): it must be owned by us or root, belong to "
                "the group and not be writable by others"
            )

    def close(self) -> None:
        """Close the directory descriptor (also done when the object is collected)."""
        self._finalizer()

    def __repr__(self) -> str:
        return f"HostStore({str(self.path)!r})"

    @property
    def _file_mode(self) -> int:
        return 0o600 if self.group is None else 0o660

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

    def _share(self, fd: int, st: os.stat_result) -> None:
        """In a group store, make a file we own usable by the group (umask aside)."""
        if self.group is not None and st.st_uid == os.getuid() and \
                stat.S_IMODE(st.st_mode) != self._file_mode:
            os.fchmod(fd, self._file_mode)

    def _via_fd(self, name: str) -> str:
        """``name`` reached through our directory descriptor, if short enough to bind."""
        proc = f"/proc/self/fd/{self.dir_fd}/{name}"
        if len(proc) < 100 and os.path.isdir(f"/proc/self/fd/{self.dir_fd}"):
            return proc
        return str(self.path / name)

    def _unlink_if(self, name: str, ident: tuple[int, int]) -> None:
        """Remove entry ``name`` only if it is still the file ``ident`` names."""
        try:
            st = os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
            if _identity(st) == ident:
                os.unlink(name, dir_fd=self.dir_fd)
        except FileNotFoundError:
            pass

    def claim(self, service: str) -> Publication:
        """Claim ``service`` for this process, clearing a crashed server's leftovers.

        Returns:
            A :class:`Publication`; bind the socket at ``bind_path``, call
            :meth:`Publication.bound`, and :meth:`Publication.withdraw` when done.

        Raises:
            NameInUse: a live server already holds the name.
            InvalidName: ``service`` is not a valid service name.
            StoreError: the lock entry is not a regular file (planted).
        """
        lock_name = f"{validate_service_name(service)}{_LOCK}"
        while True:
            try:
                fd = os.open(lock_name, os.O_RDWR | os.O_CREAT | _ENTRY, self._file_mode,
                             dir_fd=self.dir_fd)
            except OSError as exc:
                raise StoreError(f"cannot open {lock_name} in host store {self.path}: {exc}"
                                 " (a symlink or other planted file is refused)") from exc
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise StoreError(f"{lock_name} in host store {self.path} is not a regular file")
            self._share(fd, st)
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
                same = _identity(os.stat(lock_name, dir_fd=self.dir_fd,
                                         follow_symlinks=False)) == _identity(st)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        sock_name = f"{service}{_SOCKET}"
        try:
            os.unlink(sock_name, dir_fd=self.dir_fd)  # stale: no live server holds the lock
        except FileNotFoundError:
            pass
        return Publication(service, self.path / sock_name, self._via_fd(sock_name), self,
                           fd, lock_name, sock_name, _identity(st))

    def is_live(self, service: str) -> bool:
        """Whether a live server currently holds ``service`` (lock held)."""
        try:
            fd = os.open(f"{validate_service_name(service)}{_LOCK}", os.O_RDONLY | _ENTRY,
                         dir_fd=self.dir_fd)
        except OSError:
            return False  # absent, or not a file we would have made (a symlink)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def read_entry(self, name: str, limit: int = 1 << 16) -> bytes | None:
        """The content of regular file ``name`` (at most ``limit`` bytes), or ``None``.

        Symlinks and non-regular files read as absent.
        """
        try:
            fd = os.open(name, os.O_RDONLY | _ENTRY, dir_fd=self.dir_fd)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return os.read(fd, limit)
        except OSError:
            return None
        finally:
            os.close(fd)

    def write_entry(self, name: str, data: bytes) -> None:
        """Replace regular file ``name`` atomically with ``data``.

        Written to a fresh, exclusively created temporary name then renamed
        over ``name``: a planted symlink is replaced, never written through.
        The result is remembered as ours for :meth:`remove_entry`.
        """
        while True:
            tmp = f".{name}.{os.urandom(8).hex()}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _ENTRY,
                             self._file_mode, dir_fd=self.dir_fd)
                break
            except FileExistsError:
                continue
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                st = os.fstat(fd)
                self._share(fd, st)
                ident = _identity(st)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=self.dir_fd)
            except FileNotFoundError:
                pass
            raise
        self._owned[name] = ident

    def remove_entry(self, name: str) -> None:
        """Remove file ``name`` if it is the one :meth:`write_entry` last wrote here."""
        ident = self._owned.pop(name, None)
        if ident is not None:
            self._unlink_if(name, ident)

    def services(self) -> Iterator[tuple[str, bool]]:
        """Yield ``(name, live)`` for every entry in the store, sorted by name."""
        names = sorted(
            {p.stem for p in map(Path, os.listdir(self.dir_fd)) if p.suffix in (_SOCKET, _LOCK)}
        )
        for name in names:
            if NAME_RE.fullmatch(name):
                yield name, self.is_live(name)
