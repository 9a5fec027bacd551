"""A TCP relay in front of a NATS server's port, to cut a client off the network without killing anything.

    relay = Relay(nats_server.port)         # listens on a free loopback port; relay.url for the client
    relay.blackhole()                       # a pulled cable
    relay.heal()
    relay.reset()                           # a firewall that rejects: connections closed, new ones refused
    relay.close()

Modes:
- `pass`: bytes go both ways as they come.
- `blackhole`: the sockets stay open and nothing moves either way: the relay stops reading, so what
  either side sends waits in the kernel's buffers (and one chunk the relay had read, held). TCP on
  both ends sees nothing wrong; only the client's own pings (or its requests' timeouts) can tell.
  New connections are accepted and get nothing either (a client's connect times out waiting for
  the server's INFO). `heal()` lets everything through again, in order and whole, as TCP's
  retransmissions deliver what was sent into a cable that is plugged back in within its timeout.
- `reset`: every relayed connection is closed with a RST at once, and new ones are accepted and
  closed at once: the client sees the connection die, as when a firewall starts rejecting.

Real loopback sockets and threads, two per relayed connection; nothing is simulated.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Literal

Mode = Literal["pass", "blackhole", "reset"]

_CHUNK = 65536


class Relay:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"nats://{host}:{self.port}"
        self._mode: Mode = "pass"
        self._changed = threading.Condition()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._closed = False
        self.accepted = 0  # connections the relay accepted, refused ones included
        self._acceptor = threading.Thread(target=self._accept, name=f"relay-{self.port}", daemon=True)
        self._acceptor.start()

    @property
    def mode(self) -> Mode:
        return self._mode

    def blackhole(self) -> None:
        self._set("blackhole")

    def reset(self) -> None:
        self._set("reset")
        with self._changed:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            _abort(*pair)

    def heal(self) -> None:
        self._set("pass")

    def close(self) -> None:
        self._closed = True
        self.reset()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone may not, on Linux)
        except OSError:
            pass
        self._listener.close()
        self._acceptor.join(5)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _set(self, mode: Mode) -> None:
        with self._changed:
            self._mode = mode
            self._changed.notify_all()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:  # the listener was closed
                return
            self.accepted += 1
            if self._mode == "reset":
                _abort(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:  # the server is down: the client sees its connection closed, as it would
                _abort(client)
                continue
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._changed:
                self._pairs.append((client, server))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True,
                                 name=f"relay-{self.port}-pump").start()

    def _wait_to_move(self) -> bool:
        """Block while blackholed; False once the connection is to be dropped (reset or closed)."""
        with self._changed:
            while self._mode == "blackhole" and not self._closed:
                self._changed.wait()
            return self._mode == "pass" and not self._closed

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while self._wait_to_move():
                data = src.recv(_CHUNK)
                if not data:
                    break
                if not self._wait_to_move():  # read just as the cable was pulled: held until healed
                    break
                dst.sendall(data)
        except OSError:
            pass
        _abort(src, dst)
        with self._changed:
            self._pairs = [pair for pair in self._pairs if src not in pair]


def _abort(*socks: socket.socket) -> None:
    """Close with a RST (linger 0), so the peer sees a reset, not an orderly end of stream."""
    for sock in socks:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RD)  # wakes a pump's recv() without a FIN to the peer
        except OSError:
            pass
        sock.close()
