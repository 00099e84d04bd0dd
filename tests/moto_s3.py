"""A real S3 API over HTTP on loopback (moto's server) for the tests that write to object storage."""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.fs as pafs
import pytest


@contextmanager
def loopback_s3(bucket: str) -> Iterator[str]:
    """Start moto's server, point the AWS_* variables at it, make `bucket`; yields host:port."""
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            # pyarrow's S3FileSystem() ignores AWS_ENDPOINT_URL (FileSystem.from_uri, which the
            # store uses, reads it), so the bucket is made with the endpoint given.
            pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", allow_bucket_creation=True).create_dir(
                bucket
            )
            yield f"{host}:{port}"
    finally:
        server.stop()


class StoreLink:
    """A TCP relay on loopback in front of the S3 server, to take the store away mid-run.

    `cut()` does to clients what a stopped server or a network cut does: new connections are
    refused and open ones are reset. `restore()` listens again on the same port. The server
    behind keeps running, so the store comes back with its data, as a real one does after an
    outage (moto keeps its objects in the memory of the process that runs it)."""

    def __init__(self, target: str):
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.port = 0
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.listener: socket.socket | None = None
        self.restore()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def restore(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.port:
            sock.bind(("127.0.0.1", self.port))
        else:
            # Below Linux's ephemeral range (32768-60999): while the link is cut, no outgoing
            # connection can take the port as its own, so it is free to listen on again.
            for port in random.sample(range(20000, 32000), 50):
                with contextlib.suppress(OSError):
                    sock.bind(("127.0.0.1", port))
                    break
        sock.listen(64)
        sock.settimeout(0.2)
        self.port = sock.getsockname()[1]
        self.listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            listener, self.listener = self.listener, None
            conns, self.open = self.open, set()
        # shutdown() first: it acts at once even while another thread is blocked on the socket
        # (close() alone leaves the socket alive until that call returns).
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def refuses(self) -> bool:
        """Whether a new connection is refused now (the link is really cut)."""
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
        except ConnectionRefusedError:
            return True
        return False

    def _accept(self, sock: socket.socket) -> None:
        while self.listener is sock:
            try:
                client, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.listener is not sock:  # cut while this one was being accepted
                    client.close()
                    upstream.close()
                    return
                self.open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.close()
        with self.lock:
            self.open -= {src, dst}
