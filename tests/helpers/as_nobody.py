"""Act as another local user (``nobody``) against a root-owned host store.

Started as root so that it can import meshlink and its packages (which
``nobody`` may not be able to reach), it then drops to ``nobody`` for good
and does one thing, printing one JSON line: what happened.

    as_nobody.py try-entries STORE NAME    create/replace NAME's entries
    as_nobody.py plant-symlink PATH TARGET  plant a symlink at PATH
    as_nobody.py plant-dir PATH             plant a directory (mode 0777)
    as_nobody.py connect-vchan STORE NAME   connect to a vchan service (group store)
    as_nobody.py open-blk STORE TARGET      open a blk disk (group store)
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import sys
from collections.abc import Callable

import trio

from meshlink.disk.blk.front import open_blk
from meshlink.transport.vchan import connect_vchan
from resolver import HostStore


def _drop() -> None:
    who = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setresgid(who.pw_gid, who.pw_gid, who.pw_gid)
    os.setresuid(who.pw_uid, who.pw_uid, who.pw_uid)
    assert os.getuid() == who.pw_uid and os.geteuid() == who.pw_uid


def _attempt(fn: Callable[[], object]) -> str:
    try:
        fn()
    except OSError as exc:
        return type(exc).__name__
    return "done"


def try_entries(store: str, name: str) -> dict[str, str]:
    """Everything a hijacker would try on NAME's entries."""
    sock = os.path.join(store, f"{name}.sock")
    lock = os.path.join(store, f"{name}.lock")
    record = os.path.join(store, f"{name}.meshlink.json")

    def bind() -> None:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(sock)
        finally:
            s.close()

    return {
        "create-lock": _attempt(lambda: os.close(os.open(lock, os.O_RDWR | os.O_CREAT, 0o600))),
        "write-record": _attempt(lambda: os.close(os.open(record, os.O_WRONLY | os.O_CREAT))),
        "unlink-socket": _attempt(lambda: os.unlink(sock)),
        "bind-socket": _attempt(bind),
        "rename-over-socket": _attempt(lambda: os.rename("/tmp", sock)),
        "list-store": _attempt(lambda: os.listdir(store)),
    }


async def _client(kind: str, store: str, target: str) -> str:
    hs = HostStore(store, group=os.getgid())
    try:
        with trio.fail_after(10):
            if kind == "vchan":
                s = await connect_vchan(target, host_store=hs)
                await s.aclose()
            else:
                async with open_blk(target, host_store=hs):
                    pass
    except Exception as exc:  # reported, not raised: the test judges it
        return f"{type(exc).__name__}: {exc}"
    return "connected"


def main() -> None:
    what, *args = sys.argv[1:]
    _drop()
    result: object
    if what == "try-entries":
        result = try_entries(*args)
    elif what == "plant-symlink":
        os.symlink(args[1], args[0])
        result = "planted"
    elif what == "plant-dir":
        os.mkdir(args[0])
        os.chmod(args[0], 0o777)
        result = "planted"
    elif what == "connect-vchan":
        result = trio.run(_client, "vchan", args[0], args[1])
    elif what == "open-blk":
        result = trio.run(_client, "blk", args[0], args[1])
    else:
        raise SystemExit(f"unknown action {what}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
