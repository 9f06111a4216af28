"""A real S3-compatible server for tests: moto's ThreadedMotoServer on 127.0.0.1, a free port.

`s3_server` (session): the server, started once; a test may stop it and start it again on the same port
(moto keeps its buckets in this process, so they survive a restart). `s3` (per test): dummy credentials
in the environment for this test only, and a fresh bucket; `s3.url("a/b")` -> `s3://BUCKET/a/b`,
`s3.options` -> the storage options that point at the server.

Use from a test module with `from s3server import s3, s3_server  # noqa: F401`, or from conftest.py
with `pytest_plugins = ["s3server"]`.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import socket
import threading
import urllib.request
from typing import Any, Iterator

import pytest

DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "itsim-test-key", "AWS_SECRET_ACCESS_KEY": "itsim-test-secret",
                     "AWS_DEFAULT_REGION": "us-east-1"}
_bucket_numbers = itertools.count()


class S3Server:
    """A ThreadedMotoServer that can be stopped and restarted on the port it first got."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self.port = 0
        self.server: Any = None
        self.auth = False
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.server is not None

    def start(self) -> None:
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def require_auth(self, enabled: bool) -> None:
        """Make the server check every request's credentials (moto's IAM auth), or stop checking."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", method="POST",
                                         data=b"0" if enabled else b"inf", headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        self.auth = enabled


class CutProxy:
    """A TCP proxy 127.0.0.1:PORT -> the server that can fail like a network or a dying server.

    `cut_after(upstream=N)` / `cut_after(downstream=N)`: once N more bytes went to (from) the server,
    every connection is dropped and the port refuses connections until `up()`. `down()` does the same
    at once. Faults cut a transfer in the middle, which stopping moto cannot do (its request threads
    finish what they started).
    """

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._budget: dict[str, int | None] = {"up": None, "down": None}
        self._listener: socket.socket | None = None
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(32)
            self.port, self._listener = listener.getsockname()[1], listener
            self._budget = {"up": None, "down": None}
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        for sock in ([listener] if listener else []) + conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def cut_after(self, upstream: int | None = None, downstream: int | None = None) -> None:
        with self._lock:
            self._budget = {"up": upstream, "down": downstream}

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # down()
            server = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    budget = self._budget[direction]
                    if budget is not None:
                        self._budget[direction] = budget - len(data)
                if budget is not None and budget - len(data) < 0:
                    dst.sendall(data[:max(budget, 0)])
                    self.down()
                    return
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request in the test log
    server = S3Server()
    yield server
    server.stop()


@dataclasses.dataclass
class Bucket:
    server: S3Server
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return {"endpoint_url": self.server.endpoint}

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}" if key else f"s3://{self.name}"

    def client(self) -> Any:
        """A boto3 client for looking at the server behind itsim's back (pending uploads, raw keys)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.server.endpoint)


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bucket]:
    """A fresh, empty bucket on a running server, with dummy credentials set for this test only."""
    for name, value in DUMMY_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)  # nothing from the machine's ~/.aws
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "ITSIM_STORAGE_OPTIONS"):
        monkeypatch.delenv(name, raising=False)
    if not s3_server.running:
        s3_server.start()
    bucket = Bucket(s3_server, f"itsim-test-{next(_bucket_numbers)}")
    bucket.client().create_bucket(Bucket=bucket.name)
    yield bucket
    if not s3_server.running:  # a test that stopped the server leaves it running for the next one
        s3_server.start()
    if s3_server.auth:
        s3_server.require_auth(False)
