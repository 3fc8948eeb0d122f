"""What a harness needs to drive ``meshlink disk serve``: a pidfile and an exit with its parent.

``--pidfile PATH`` and ``--exit-with-parent`` mean what nbdkit's ``-P`` and
``--exit-with-parent`` mean, so a test harness or a supervisor can start a
server, wait until it accepts connections and be sure it does not outlive
the harness:

* the pidfile is written once the server accepts connections (its
  appearance *is* the readiness signal) and removed when it stops;
* with ``--exit-with-parent``, the death of the process that started the
  server sends it SIGTERM, which stops it as SIGTERM always does: services
  withdrawn from the host store and zeroconf, connections closed.

The pidfile is written as a privileged daemon's should be, since it often
lands in a shared directory: a symlink at PATH (or a directory on the way
owned by someone else than root or us) is refused before anything is
served; the pid goes into a new file created with ``O_EXCL | O_NOFOLLOW``
beside PATH, then renamed over it, so PATH never holds a partial pid and a
link planted there later is replaced, not followed.  On exit the file is
removed only if it still holds our pid.

This module owns the two options; ``cli/disk.py`` calls :meth:`Daemon.start`
before opening anything, :meth:`Daemon.ready` once serving and
:meth:`Daemon.close` on the way out.  ``ctypes`` is imported only when
``--exit-with-parent`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys

from ._common import CommandFailed

__all__ = ["Daemon", "add_daemon_options"]

#: ``<linux/prctl.h>``: deliver a signal to this process when its parent exits.
_PR_SET_PDEATHSIG = 1
#: The signal it gets: SIGTERM, the one ``serve`` stops cleanly on.
_SIGTERM = 15


def add_daemon_options(p: argparse.ArgumentParser) -> None:
    """Add ``--pidfile``, ``--exit-with-parent`` and ``--foreground`` to a serve parser."""
    p.add_argument("--pidfile", "-P", metavar="PATH",
                   help="write the server's pid to PATH once it accepts connections (wait "
                        "for PATH to appear to know it is ready); removed on exit; a symlink "
                        "at PATH is refused")
    p.add_argument("--exit-with-parent", action="store_true",
                   help="stop (cleanly, as on SIGTERM) when the process that started this "
                        "one exits (Linux)")
    p.add_argument("--foreground", "-f", action="store_true",
                   help="accepted for nbdkit compatibility: serve always stays in the "
                        "foreground")


class Daemon:
    """The pidfile and parent-death settings of one ``serve`` run.

    Args:
        pidfile: where to write the pid once ready, or ``None``.
        exit_with_parent: stop when the parent process exits.
    """

    def __init__(self, pidfile: str | None, exit_with_parent: bool) -> None:
        self.pidfile = os.path.abspath(pidfile) if pidfile else None
        self.exit_with_parent = exit_with_parent
        self._written = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Daemon:
        """The settings ``add_daemon_options`` parsed into ``args``."""
        return cls(getattr(args, "pidfile", None), getattr(args, "exit_with_parent", False))

    def start(self) -> bool:
        """Check the pidfile path and arrange the exit with the parent; call before serving.

        Returns:
            False when the parent has already exited (the caller should stop at
            once, successfully); True otherwise.

        Raises:
            CommandFailed: the pidfile path is refused (a symlink, a directory
                that is missing or not trusted), or ``--exit-with-parent`` on a
                system without ``prctl``.
        """
        if self.pidfile is not None:
            _check_path(self.pidfile)
        if self.exit_with_parent:
            return _die_with_parent()
        return True

    def ready(self) -> None:
        """Write the pidfile (if asked for): the server now accepts connections.

        Raises:
            CommandFailed: the file could not be written.
        """
        if self.pidfile is None or self._written:
            return
        _check_path(self.pidfile)  # again: the directory may have changed meanwhile
        directory, name = os.path.split(self.pidfile)
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                             | os.O_CLOEXEC)
        except OSError as exc:
            raise CommandFailed(f"--pidfile {self.pidfile}: {exc.strerror}") from None
        temp = f".{name}.{os.getpid()}.tmp"
        try:
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
            except OSError as exc:
                raise CommandFailed(f"--pidfile {self.pidfile}: cannot create {temp}: "
                                    f"{exc.strerror}") from None
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(f"{os.getpid()}\n")
                # rename() replaces whatever is at NAME, a symlink included,
                # without following it: readers see no file or the whole pid.
                os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=dir_fd)
                raise CommandFailed(f"--pidfile {self.pidfile}: {exc.strerror}") from None
            self._written = True
        finally:
            os.close(dir_fd)

    def close(self) -> None:
        """Remove the pidfile if this process wrote it and it still holds our pid."""
        if self.pidfile is None or not self._written:
            return
        self._written = False
        try:
            with open(self.pidfile, "rb", opener=_open_nofollow) as f:
                mine = f.read(32).strip() == str(os.getpid()).encode()
            if mine:
                os.unlink(self.pidfile)
        except OSError:  # already gone, or replaced by a link: not ours to remove
            pass


def _open_nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


def _check_path(path: str) -> None:
    """Refuse a pidfile path through an untrusted symlink, or at one.

    Raises:
        CommandFailed: PATH is a symlink, a directory on the way is a symlink
            owned by someone other than root or us, or the directory is missing.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise CommandFailed(f"--pidfile {path}: {exc.strerror}") from None
    else:
        if stat.S_ISLNK(st.st_mode):
            raise CommandFailed(f"--pidfile {path} is a symbolic link: refusing to write "
                                f"through it (remove it, or choose another path)")
        if not stat.S_ISREG(st.st_mode):
            raise CommandFailed(f"--pidfile {path} exists and is not a regular file")
    trusted = {0, os.geteuid()}
    walked = "/"
    for part in os.path.dirname(path).split("/"):
        if not part:
            continue
        walked = os.path.join(walked, part)
        try:
            st = os.lstat(walked)
        except OSError as exc:
            raise CommandFailed(f"--pidfile {path}: {walked}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in trusted:
            raise CommandFailed(f"--pidfile {path}: {walked} is a symbolic link owned by "
                                f"uid {st.st_uid}: refusing to write through it")


def _die_with_parent() -> bool:
    """Ask Linux for SIGTERM when the parent exits; False if it has already exited."""
    if not sys.platform.startswith("linux"):
        raise CommandFailed("--exit-with-parent needs Linux (prctl PR_SET_PDEATHSIG)")
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, _SIGTERM, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise CommandFailed(f"--exit-with-parent: prctl failed: {os.strerror(err)}")
    # The parent may have exited before the prctl took effect; then we were
    # reparented (getppid changed) and no signal will ever come.
    return os.getppid() == parent
