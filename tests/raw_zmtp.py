"""A raw ZMTP 3.0 peer: what a ZeroMQ receiver sees of a message before it has read it (the
hostile-input and fuzz tests declare frames larger than a socket's ZMQ_MAXMSGSIZE with it)."""
from __future__ import annotations

import socket
import struct
import time


def zmtp_push(path: str, declared: int, payload: bytes) -> socket.socket:
    """A raw ZMTP 3.0 PUSH peer on an ipc endpoint that starts a frame of `declared` bytes and sends
    `payload` of it: what a ZeroMQ receiver sees of a huge message before it is read."""
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(path)
    peer.sendall(b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + bytes(31))
    ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 4) + b"PUSH"
    peer.sendall(b"\x04" + bytes([len(ready)]) + ready)
    peer.sendall(b"\x02" + struct.pack(">Q", declared) + payload)  # a long frame, the last of its message
    return peer


def dropped(peer: socket.socket, within_s: float) -> bool:
    """Whether the receiver closed the connection within `within_s`."""
    peer.settimeout(within_s)
    deadline = time.monotonic() + within_s
    try:
        while time.monotonic() < deadline:
            if not peer.recv(4096):  # the receiver's greeting and READY come first
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False
