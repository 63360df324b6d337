"""An object store with a network in front of it, on 127.0.0.1: the tests' faults and `deeprec bench
checkpoint`'s slow link. A TCP proxy before the S3 server (moto, `s3_server`) that:

- cuts every `cut_every`-th connection after `cut_after` bytes of the server's reply, then resets
  both sides: the client sees a connection reset or a body cut short, as with a flaky object store.
- answers every `throttle_every`-th connection `503 SlowDown` itself, as S3 answers a prefix that
  gets more requests than it can take.
- with a `seed`, cuts each connection with probability 1/`cut_every` and throttles with
  1/`throttle_every` instead (seeded, so a run is repeatable), so that no retry pattern can keep
  meeting the same fault.
- `stall_request_after` / `stall_response_after`: stops forwarding every connection after that many
  bytes of the request (an upload) or of the reply (a download) and hangs, so that a test can kill
  -9 a process in the middle of a transfer.
- `bandwidth` (bytes/s): a link of that speed in each direction, shared by every connection, as a
  node's share of its path to S3.
- counts `bytes_to_client` (what readers fetched) and `bytes_to_server` (what writers uploaded).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator

from deeprecognition.errors import DeepRecError

_SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
)
# What every test server accepts: never hand real keys to a server of ours.
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class _Link:
    """One direction of a link of `rate` bytes/s: chunks from all connections queue for it."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._free_at = time.monotonic()
        self._lock = threading.Lock()

    def carry(self, nbytes: int) -> None:
        """Wait until `nbytes` have crossed the link behind whatever was sent before them."""
        if not self.rate:
            return
        with self._lock:
            done = max(self._free_at, time.monotonic()) + nbytes / self.rate
            self._free_at = done
        time.sleep(max(0.0, done - time.monotonic()))


class FaultProxy:
    def __init__(
        self,
        upstream: tuple[str, int],
        cut_every: int = 3,
        cut_after: int = 200,
        throttle_every: int = 0,
        stall_request_after: int | None = None,
        stall_response_after: int | None = None,
        seed: int | None = None,
        bandwidth: float | None = None,
    ) -> None:
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
        self.bytes_to_server = 0
        self._links = {True: _Link(bandwidth), False: _Link(bandwidth)}  # keyed by to_client
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
            threading.Thread(
                target=self._pump, args=(client, server, None, self.stall_request_after), daemon=True
            ).start()
            threading.Thread(
                target=self._pump,
                args=(server, client, self.cut_after if cut else None, self.stall_response_after, True),
                daemon=True,
            ).start()

    def _hits(self, every: int) -> bool:
        if every <= 0:
            return False
        return self._random.random() < 1 / every if self._random else self.connections % every == 0

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        limit: int | None,
        stall: int | None = None,
        to_client: bool = False,
    ) -> None:
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
        self._links[to_client].carry(len(data))
        dst.sendall(data)
        with self._lock:
            if to_client:
                self.bytes_to_client += len(data)
            else:
                self.bytes_to_server += len(data)

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


@contextlib.contextmanager
def s3_server(bucket: str) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 holding one empty bucket; yields its URL. Its fake credentials
    are put in this process's environment for the block (Ray processes started inside inherit them)."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise DeepRecError("needs moto, an S3 server for 127.0.0.1: pip install -e '.[test]'") from None
    before = {key: os.environ.get(key) for key in FAKE_CREDENTIALS}
    os.environ.update(FAKE_CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
        yield url
    finally:
        server.stop()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
