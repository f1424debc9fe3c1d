"""Real servers on loopback for fault tests: a moto S3 server in its own process (which a test can
freeze with SIGSTOP and thaw with SIGCONT, as a hung endpoint or a dead NAT path behaves: its
connections stay open, nothing answers), a TCP proxy that can drop or slow the connection, and a
server that never answers and counts what it was asked."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from tests.clirun import clean_env

# S3 timeouts short enough for a test: a request is given up on after two tries of about a second.
FAST_S3 = {"CELLMI_TIMEOUTS__S3_CONNECT_S": "1", "CELLMI_TIMEOUTS__S3_READ_S": "1",
           "CELLMI_TIMEOUTS__S3_ATTEMPTS": "2"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


class Proxy:
    """A TCP forwarder in the test process between cellmi and a real S3 server.

    ``close()`` is a network fault: open connections are reset and new ones refused. ``open()``
    listens on the same port again, in front of the same server (and data). ``delay`` slows each
    forwarded chunk, so that inference is still running when the fault comes.
    """

    def __init__(self, target_port: int, delay: float = 0.0) -> None:
        self.target, self.delay, self.port = target_port, delay, free_port()
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        self.listener: socket.socket | None = None
        self.stop = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        sock.settimeout(0.05)
        self.listener, self.stop = sock, threading.Event()
        threading.Thread(target=self._accept, args=(sock, self.stop), daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        with self.lock:
            conns, self.conns = self.conns, set()
        for conn in conns:
            self._drop(conn)

    def _accept(self, sock: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                self._drop(client)
                continue
            with self.lock:
                if stop.is_set():
                    self._drop(client)
                    self._drop(upstream)
                    return
                self.conns |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                if self.delay:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(src)
            self._drop(dst)

    @staticmethod
    def _drop(conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()


class MotoServer:
    """``moto_server`` as a subprocess on 127.0.0.1; ``frozen()`` stops it for the length of a block."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(up, 30, "the moto server", poll=0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def freeze(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.thaw()
        self.process.terminate()
        self.process.wait(timeout=10)


class SilentServer:
    """Accepts connections and reads requests, never answers (an endpoint that hangs); counts them."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[str] = []  # request lines, in arrival order
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(1 << 16):
                    self.requests += [line for line in data.decode("latin-1").split("\r\n")
                                      if line.endswith(" HTTP/1.1")]
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
