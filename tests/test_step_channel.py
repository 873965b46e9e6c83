"""The step socket between the driver and a worker (runtime/step_channel.py), in one process."""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import threading
import time

import pytest

from raypp.runtime import step_channel
from raypp.runtime.step_channel import StepClient, StepFailed, StepServer, WorkerLost, _frame, _raw_frame
from raypp.runtime.step import StepInput


def step(step_id: int) -> StepInput:
    return StepInput([step_id], [1], [1], [[0]], [0], [], [], [], step_id=step_id)


def serve(execute, token: str = "secret") -> tuple[str, int]:
    return "127.0.0.1", StepServer(execute, lambda: None, token).port


def test_replies_come_back_in_step_order_from_every_worker():
    seen = [[], []]

    def worker(i):
        def execute(s):
            seen[i].append(s.step_id)
            return (i, s.step_id)
        return execute

    client = StepClient([serve(worker(0)), serve(worker(1))], "secret", 10.0)
    try:
        handles = [client.submit(step(k)) for k in range(20)]
        got = [asyncio.run(client.outputs(h)) for h in handles]
    finally:
        client.close()
    assert got == [[(0, k), (1, k)] for k in range(20)]
    assert seen == [list(range(20))] * 2


def test_a_step_that_raises_fails_alone_with_the_workers_traceback():
    def execute(s):
        if s.step_id == 1:
            raise ValueError("bad block table")
        return s.step_id

    client = StepClient([serve(execute)], "secret", 10.0)
    try:
        first, bad, after = (client.submit(step(k)) for k in range(3))
        assert asyncio.run(client.outputs(first)) == [0]
        with pytest.raises(StepFailed, match="(?s)worker rank 0.*ValueError: bad block table"):
            asyncio.run(client.outputs(bad))
        assert asyncio.run(client.outputs(after)) == [2]
    finally:
        client.close()


def _worker_process(conn) -> None:
    def execute(s):
        if s.step_id == 1:
            time.sleep(60)   # killed meanwhile
        return s.step_id
    conn.send(StepServer(execute, lambda: None, "secret").port)
    time.sleep(60)


def test_a_worker_that_dies_fails_its_pending_and_later_steps():
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker_process, args=(child,), daemon=True)
    proc.start()
    client = StepClient([("127.0.0.1", parent.recv()), serve(lambda s: s.step_id)], "secret", 10.0)
    try:
        handles = [client.submit(step(k)) for k in range(3)]
        assert asyncio.run(client.outputs(handles[0])) == [0, 0]
        os.kill(proc.pid, signal.SIGKILL)
        for h in handles[1:]:
            with pytest.raises(WorkerLost, match="worker rank 0 stopped answering"):
                asyncio.run(asyncio.wait_for(client.outputs(h), 10))
        with pytest.raises(WorkerLost):
            asyncio.run(client.outputs(client.submit(step(3))))
    finally:
        client.close()
        proc.join(10)


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:   # closed with our bytes still unread on its side
        return True


def test_a_connection_without_the_token_is_turned_away_unread(monkeypatch):
    monkeypatch.setattr(step_channel, "_HANDSHAKE_TIMEOUT_S", 0.5)
    address = serve(lambda s: s.step_id, token="right")
    with socket.create_connection(address, timeout=10) as silent:     # says nothing: dropped after 0.5 s
        assert closed_by_peer(silent)
    for stray_bytes in (_frame("right"), _raw_frame(b"wrong")):  # a pickle is not the token
        with socket.create_connection(address, timeout=10) as stray:
            stray.sendall(stray_bytes)
            assert closed_by_peer(stray)
    client = StepClient([address], "right", 10.0)
    try:
        assert asyncio.run(client.outputs(client.submit(step(5)))) == [5]
    finally:
        client.close()


def test_a_step_outlives_the_event_loop_that_stopped_waiting_for_it():
    gate = threading.Event()

    def execute(s):
        gate.wait(10)
        return s.step_id

    client = StepClient([serve(execute)], "secret", 10.0)
    try:
        handle = client.submit(step(7))

        async def give_up():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.outputs(handle), 0.05)
        asyncio.run(give_up())          # that loop ends with the step still in flight
        gate.set()
        assert asyncio.run(client.outputs(handle)) == [7]
    finally:
        client.close()
