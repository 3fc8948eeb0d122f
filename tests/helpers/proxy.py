"""A TCP proxy on loopback whose connections a test can reset at will.

``python3 -m tests.helpers.proxy LISTEN_PORT TARGET_PORT`` runs it as a
process (prints ``ready PORT`` once listening; SIGUSR1 resets its
connections), so a test can also SIGKILL it and start another on the same
port; :class:`Proxy` is the in-process form.
"""

from __future__ import annotations

import socket
import struct
import sys

import trio

__all__ = ["Proxy"]

_LINGER_RESET = struct.pack("ii", 1, 0)  # close() sends RST instead of FIN


class Proxy:
    """Forwards every connection to ``127.0.0.1:target``; :meth:`cut` resets them all."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.accepted = 0
        self._pairs: set[tuple[trio.SocketStream, trio.SocketStream]] = set()

    async def run(self, port: int = 0, *,
                  task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.target)
        except OSError:
            await client.aclose()
            return
        pair = (client, server)
        self._pairs.add(pair)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
        finally:
            self._pairs.discard(pair)
            for s in pair:
                await trio.aclose_forcefully(s)

    @staticmethod
    async def _pump(src: trio.SocketStream, dst: trio.SocketStream,
                    scope: trio.CancelScope) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    def cut(self) -> int:
        """Reset every connection now (both sides see ECONNRESET); returns how many."""
        n = 0
        for pair in list(self._pairs):
            self._pairs.discard(pair)  # cut once: its pumps finish on their own
            for s in pair:
                s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                s.socket.close()
            n += 1
        return n


async def _main(port: int, target: int) -> None:
    """Run a proxy process; SIGUSR1 resets every connection it carries."""
    import signal

    proxy = Proxy(target)
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run, port)
            print(f"ready {proxy.port}", flush=True)
            async for _ in signals:
                proxy.cut()


if __name__ == "__main__":
    trio.run(_main, int(sys.argv[1]), int(sys.argv[2]))
