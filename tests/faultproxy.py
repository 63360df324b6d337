"""A TCP proxy on 127.0.0.1 in front of the S3 server that injects its faults, to test S3 for real.

- Every `cut_every`-th connection forwards only `cut_after` bytes of the server's reply, then resets
  both sides: the client sees a connection reset or a body cut short, as with a flaky object store.
- Every `throttle_every`-th connection is answered `503 SlowDown` by the proxy itself, as S3 answers
  a prefix that gets more requests than it can take.
- With a `seed`, each connection is cut with probability 1/`cut_every` and throttled with
  1/`throttle_every` instead (seeded, so a run is repeatable), so that no retry pattern can keep
  meeting the same fault.
- `stall_request_after` / `stall_response_after`: every connection stops forwarding after that many
  bytes of the request (an upload) or of the reply (a download) and hangs, so that a test can kill
  -9 a process in the middle of a transfer.
- `bytes_to_client` counts the bytes forwarded from the server to the client: what a reader fetched.
"""

from __future__ import annotations

import random
import re
import socket
import struct
import threading

_SLOW_DOWN_BODY = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>'


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], cut_every: int = 3, cut_after: int = 200, throttle_every: int = 0,
                 stall_request_after: int | None = None, stall_response_after: int | None = None, seed: int | None = None) -> None:
        self.upstream = upstream
        self.cut_every = cut_every
        self.cut_after = cut_after
        self.throttle_every = throttle_every
        self.stall_request_after = stall_request_after
        self.stall_response_after = stall_response_after
        self.connections = 0
        self.cuts = 0
        self.throttled = 0
        self.stalls = 0
        self.bytes_to_client = 0
        self._random = random.Random(seed) if seed is not None else None
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._closed = threading.Event()

    @classmethod
    def before(cls, server_url: str, **faults) -> FaultProxy:
        """A started proxy in front of the server at http://host:port."""
        host, port = server_url.removeprefix("http://").split(":")
        return cls((host, int(port)), **faults).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def start(self) -> FaultProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._closed.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                cut, throttle = (self._hits(every) for every in (self.cut_every, self.throttle_every))
            if throttle:
                threading.Thread(target=self._slow_down, args=(client,), daemon=True).start()
                continue
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, None, self.stall_request_after), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.cut_after if cut else None, self.stall_response_after, True), daemon=True).start()

    def _hits(self, every: int) -> bool:
        if every <= 0:
            return False
        return self._random.random() < 1 / every if self._random else self.connections % every == 0

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None, stall: int | None = None, to_client: bool = False) -> None:
        sent = 0
        try:
            while chunk := src.recv(65536):
                if stall is not None and sent + len(chunk) > stall:
                    self._forward(dst, chunk[: max(0, stall - sent)], to_client)
                    with self._lock:
                        self.stalls += 1
                    self._closed.wait()  # hang mid-transfer until the proxy stops
                    break
                if limit is not None and sent + len(chunk) > limit:
                    self._forward(dst, chunk[: max(0, limit - sent)], to_client)
                    with self._lock:
                        self.cuts += 1
                    break
                self._forward(dst, chunk, to_client)
                sent += len(chunk)
        except OSError:
            pass
        for s in (src, dst):
            _reset(s)

    def _forward(self, dst: socket.socket, data: bytes, to_client: bool) -> None:
        dst.sendall(data)
        if to_client:
            with self._lock:
                self.bytes_to_client += len(data)

    def _slow_down(self, client: socket.socket) -> None:
        """Read one request, answer 503 SlowDown and close, as a throttling S3 does (before the body
        when the client waits for `100 Continue`)."""
        try:
            client.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data and (chunk := client.recv(65536)):
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            waits = re.search(rb"(?im)^expect:\s*100-continue", head)
            while length and not waits and len(body) < int(length.group(1)) and (chunk := client.recv(65536)):
                body += chunk
            reply = b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
            reply += b"Content-Length: %d\r\n\r\n" % len(_SLOW_DOWN_BODY)
            client.sendall(reply if head.startswith(b"HEAD ") else reply + _SLOW_DOWN_BODY)
            with self._lock:
                self.throttled += 1
        except OSError:
            pass
        client.close()


def _reset(sock: socket.socket) -> None:
    """Drop the connection now: shutdown wakes the other pump blocked in recv on this socket
    (close alone would not), and a zero linger makes the close a reset."""
    for step in (
        lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)),
        lambda: sock.shutdown(socket.SHUT_RDWR),
        sock.close,
    ):
        try:
            step()
        except OSError:
            pass
