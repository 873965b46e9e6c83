"""Steps to the workers over a socket per worker, not as one Ray actor call each.

Ray still places, starts, pings and kills the workers; only the step stream leaves
Ray's task path.  Measured (benchmarks/ray_call_cost.py): an actor call costs the
step ~1 ms of latency and the driver ~0.3 ms of CPU per worker, paid twice per step
on the token's way round a pipeline.  A Ray Compiled Graph cuts the latency to
~0.15 ms, but its channels poll: an idle worker burns about half a core and the
waiting driver a whole one, which on CPU workers of one core each costs more than
it saves.  A TCP socket whose reader blocks in the kernel costs tens of
microseconds and no CPU while idle, and reaches workers on other nodes too.

Protocol, one connection per worker, both directions in step order: a frame is an
8-byte length and a pickle.  The driver first sends the token the worker was given
through Ray, as raw bytes (a stray connection to the port is turned away unread), then
`StepInput`s; the
worker runs each and sends back its `StepOutput`, or a `StepFailure` when it raised.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import pickle
import socket
import struct
import threading
import traceback
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from raypp.runtime.step import StepInput, StepOutput

_HEADER = struct.Struct("!Q")
_HANDSHAKE_TIMEOUT_S = 10.0


class WorkerLost(RuntimeError):
    """A worker's step connection closed: its process died or was killed."""


class StepFailed(RuntimeError):
    """A step raised on a worker; the message carries the worker's traceback."""


@dataclass
class StepFailure:
    error: str


def _raw_frame(data: bytes) -> bytes:
    return _HEADER.pack(len(data)) + data


def _frame(obj: Any) -> bytes:
    return _raw_frame(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _send(sock: socket.socket, obj: Any) -> None:
    sock.sendall(_frame(obj))


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


def _recv(sock: socket.socket) -> Any:
    """The next frame's object; None once the peer has closed the connection."""
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    body = _recv_exactly(sock, _HEADER.unpack(header)[0])
    return None if body is None else pickle.loads(body)


def _no_delay(sock: socket.socket) -> socket.socket:
    # A step is one small write: send it now, not after Nagle's delay.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def settled(future: Future) -> Any:
    """The future's result, awaited without tying the future to this event loop: unlike
    `asyncio.wrap_future`, a waiter cancelled here (its loop ended) leaves the step's future
    alone, so the next loop can still await it."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: Future) -> None:
        try:
            loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))
        except RuntimeError:  # that loop has closed; nobody waits there any more
            pass

    future.add_done_callback(wake)
    await waiter
    return future.result()


class StepServer:
    """Worker side: a thread that accepts the driver's connection and runs its steps in order.

    `on_start` runs first on that thread (e.g. torch's per-thread settings)."""

    def __init__(self, execute: Callable[[StepInput], StepOutput], on_start: Callable[[], None], token: str):
        self._listener = socket.create_server(("", 0))
        self.port = self._listener.getsockname()[1]
        self._execute, self._on_start, self._token = execute, on_start, token
        threading.Thread(target=self._serve, name="raypp-steps", daemon=True).start()

    def _accept(self) -> socket.socket:
        # The token is compared as raw bytes, never unpickled: a stray peer gets no pickle.loads.
        expected = self._token.encode()
        while True:
            conn, _ = self._listener.accept()
            try:
                conn.settimeout(_HANDSHAKE_TIMEOUT_S)   # a silent stray peer must not block the driver
                header = _recv_exactly(conn, _HEADER.size)
                size = _HEADER.unpack(header)[0] if header else 0
                got = _recv_exactly(conn, size) if 0 < size <= len(expected) else None
                if got is not None and hmac.compare_digest(got, expected):
                    conn.settimeout(None)
                    self._listener.close()
                    return _no_delay(conn)
            except OSError:
                pass
            conn.close()

    def _serve(self) -> None:
        self._on_start()
        with self._accept() as conn:
            while (step := _recv(conn)) is not None:
                try:
                    out = self._execute(step)
                except Exception:
                    out = StepFailure(traceback.format_exc())
                _send(conn, out)


class StepClient:
    """Driver side: one connection per worker; a step's outputs are futures any event loop can await.

    One reader thread per connection takes the replies in order and settles the oldest
    pending future; a closed connection fails every pending and later step with `WorkerLost`."""

    def __init__(self, addresses: list[tuple[str, int]], token: str, connect_timeout_s: float):
        self._conns: list[socket.socket] = []
        self._pending: list[collections.deque[Future]] = []
        self._lock = threading.Lock()   # the pending queues: a reader and a failing sender both pop them
        self._lost: str | None = None
        try:
            for rank, address in enumerate(addresses):
                conn = _no_delay(socket.create_connection(address, timeout=connect_timeout_s))
                conn.settimeout(None)
                conn.sendall(_raw_frame(token.encode()))
                self._conns.append(conn)
                self._pending.append(collections.deque())
                threading.Thread(target=self._read, args=(rank,), name=f"raypp-steps-{rank}", daemon=True).start()
        except BaseException:
            self.close()
            raise

    def submit(self, step: StepInput) -> list[Future]:
        frame = _frame(step)   # pickled once for every worker
        futures = []
        for rank, conn in enumerate(self._conns):
            future: Future = Future()
            futures.append(future)
            with self._lock:
                if self._lost is not None:
                    future.set_exception(WorkerLost(self._lost))
                    continue
                # Queued before the send: the reply can arrive before sendall returns.
                self._pending[rank].append(future)
            try:
                conn.sendall(frame)
            except OSError as e:
                self.fail(f"worker rank {rank}: sending a step failed ({e})")
        return futures

    async def outputs(self, futures: list[Future]) -> list[StepOutput]:
        return [await settled(f) for f in futures]

    def _read(self, rank: int) -> None:
        conn, pending = self._conns[rank], self._pending[rank]
        while True:
            try:
                out = _recv(conn)
            except OSError as e:
                out = e
            if out is None or isinstance(out, OSError):
                why = "the connection closed" if out is None else str(out)
                self.fail(f"worker rank {rank} stopped answering steps ({why}): its process died "
                          f"or was killed")
                return
            with self._lock:
                if not pending:   # failed meanwhile: every future already has its exception
                    return
                future = pending.popleft()
            if isinstance(out, StepFailure):
                future.set_exception(StepFailed(f"a step failed on worker rank {rank}:\n{out.error}"))
            else:
                future.set_result(out)

    def fail(self, why: str) -> None:
        """Every pending and later step fails with WorkerLost(why)."""
        with self._lock:
            self._lost = self._lost or why
            lost = [f for futures in self._pending for f in futures]
            for futures in self._pending:
                futures.clear()
        for future in lost:
            future.set_exception(WorkerLost(self._lost))

    def close(self) -> None:
        with self._lock:
            self._lost = self._lost or "the executor was shut down"
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
