"""Every public error survives pickling with its attributes (multiprocessing,
``concurrent.futures`` and logging handlers that ship records to another
process all pickle exceptions)."""

from __future__ import annotations

import errno
import pickle

import pytest

import meshlink
import resolver
from meshlink.bus import VersionMismatch

# One instance of each public class, made the way the library makes it.
SAMPLES: list[BaseException] = [
    meshlink.MeshlinkError("m"),
    meshlink.ProtocolError("p"),
    meshlink.LocalProtocolError("local"),
    meshlink.RemoteProtocolError("remote"),
    meshlink.TransportError("t"),
    meshlink.HandshakeError("h"),
    meshlink.AuthError("not you"),
    meshlink.ProviderUnavailable("no xen"),
    meshlink.ConnectionLost("gone"),
    meshlink.SessionLost("lost"),
    meshlink.RingCorruptError("bad index"),
    meshlink.ServiceNotFound(errno.ENOENT, "no such service"),
    meshlink.AddressInUse(errno.EADDRINUSE, "taken"),
    meshlink.InvalidName("bad name"),
    meshlink.StoreError("store"),
    meshlink.ResolveError("nothing usable"),
    meshlink.RulesError("/etc/rules.toml", 7, "bad key"),
    meshlink.DiskError("no space", errno.ENOSPC),
    meshlink.RemoteError("KeyError", "'k'"),
    VersionMismatch(1, 2),
    resolver.RulesError("/etc/rules.toml", 0, "TOML syntax"),
]


def _state(exc: BaseException) -> tuple[object, ...]:
    return (type(exc), str(exc), exc.args, sorted(vars(exc).items()))


@pytest.mark.parametrize("exc", SAMPLES, ids=lambda e: type(e).__name__)
def test_error_pickles_with_its_attributes(exc: BaseException) -> None:
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        again = pickle.loads(pickle.dumps(exc, protocol))
        assert _state(again) == _state(exc)


def test_every_public_error_is_sampled() -> None:
    public = {name for name in dir(meshlink)
              if isinstance(getattr(meshlink, name), type)
              and issubclass(getattr(meshlink, name), BaseException)}
    assert public <= {type(e).__name__ for e in SAMPLES}
