"""Small readers of raw HTTP and SSE for the simulator's tests."""

from __future__ import annotations

import json
import socket
from typing import Any


def sse(text: str) -> list[tuple[str | None, Any]]:
    """(event name or None, parsed data or the raw string) per SSE event."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name = None
        data = None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        assert data is not None, block
        events.append((name, data if data == "[DONE]" else json.loads(data)))
    return events


def raw_exchange(port: int, request: bytes, timeout: float = 10.0) -> tuple[bytes, socket.socket]:
    """Send raw bytes; the head and what followed it so far, and the still-open socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return data, sock


def post(path: str, body: dict[str, Any], host: str = "127.0.0.1") -> bytes:
    payload = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\n\r\n"
    ).encode() + payload
