"""A load-generator process: ``python -m benchmarks.loadgen SPEC.json``.

It talks to its parent on stdin/stdout, one JSON line at a time:

1. it opens its sockets and prints ``{"ready": true, ...}`` (with the
   connect-to-welcome times);
2. it waits for ``go <unix time>`` (so that several generators start
   together), then does its work and prints the result.

Modes (``spec["mode"]``):

- ``chat``: one client per target sends ``spec["message"]`` and waits for the
  reply, again and again; after ``warmup`` seconds it counts replies and
  latencies for ``duration`` seconds.
- ``idle``: the sockets stay open, answering pings, until ``close`` arrives;
  it then prints how many were still open.
- ``probe``: every ``interval`` seconds a new client connects (round robin over
  the targets), waits for its welcome and leaves; ``count`` of them.

Every mode has a hard deadline (``max_seconds``): the process ends itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from . import wsclient


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def read_line() -> str:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return line.strip()


async def wait_go() -> float:
    line = await read_line()
    if not line.startswith("go"):
        raise SystemExit(0)  # the parent gave up
    start = float(line.split()[1])
    await asyncio.sleep(max(0.0, start - time.time()))
    return start


async def open_all(spec: dict) -> tuple[list, list[float], int]:
    """Open one socket per target, ``connect_concurrency`` at a time."""
    host = spec.get("host", "127.0.0.1")
    gate = asyncio.Semaphore(spec.get("connect_concurrency", 64))
    timings: list[float] = []
    failures = 0

    async def one(target):
        nonlocal failures
        async with gate:
            try:
                conn, seconds = await wsclient.connect(host, target["port"], target["path"])
            except (OSError, asyncio.TimeoutError, wsclient.HandshakeError, ConnectionError):
                failures += 1
                return None
            timings.append(seconds * 1000)
            return conn

    conns = await asyncio.gather(*(one(target) for target in spec["targets"]))
    return [conn for conn in conns if conn is not None], timings, failures


async def chat(spec: dict) -> None:
    conns, timings, failures = await open_all(spec)
    emit({"ready": True, "connected": len(conns), "failures": failures})
    start = await wait_go()
    measure_from = start + spec.get("warmup", 1.0)
    measure_to = measure_from + spec["duration"]
    body = {"content": spec.get("message", "hello benchmark")}
    if spec.get("stream"):
        body["stream"] = True
    payload = json.dumps(body).encode()
    latencies: list[float] = []
    errors = 0

    async def client(conn) -> None:
        nonlocal errors
        frame = wsclient.masked_frame(payload)
        clock, now = time.perf_counter, time.time
        while True:
            sent_at = now()
            if sent_at >= measure_to:
                return
            began = clock()
            waiter = conn.reply()
            conn.send(frame)
            reply = await waiter
            if sent_at >= measure_from:
                latencies.append((clock() - began) * 1000)
                if b'"type": "error"' in reply:
                    errors += 1

    results = await asyncio.gather(*(client(conn) for conn in conns), return_exceptions=True)
    broken = sum(1 for result in results if isinstance(result, BaseException))
    for conn in conns:
        conn.close()
    emit({"replies": len(latencies), "errors": errors, "broken_clients": broken,
          "duration": spec["duration"], "latencies_ms": [round(x, 3) for x in latencies]})


async def idle(spec: dict) -> None:
    conns, timings, failures = await open_all(spec)
    emit({"ready": True, "connected": len(conns), "failures": failures,
          "connect_ms": [round(x, 3) for x in timings]})
    await read_line()  # "close", or end of input
    still_open = sum(1 for conn in conns if not conn.closed.done())
    for conn in conns:
        conn.close()
    await asyncio.sleep(0.2)
    emit({"still_open": still_open})


async def probe(spec: dict) -> None:
    host = spec.get("host", "127.0.0.1")
    emit({"ready": True})
    await wait_go()
    timings: list[float] = []
    failures = 0
    targets = spec["targets"]
    interval = spec.get("interval", 0.05)
    next_at = time.perf_counter()
    for index in range(spec["count"]):
        target = targets[index % len(targets)]
        try:
            conn, seconds = await wsclient.connect(host, target["port"], target["path"])
            timings.append(seconds * 1000)
            conn.close()
        except (OSError, asyncio.TimeoutError, wsclient.HandshakeError, ConnectionError):
            failures += 1
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    emit({"connect_ms": [round(x, 3) for x in timings], "failures": failures})


async def ask(spec: dict) -> None:
    """Each target carries its own message; all are sent at ``go``, streamed.

    Per client: time to the first chunk and to the final frame, from ``go``."""
    conns, _timings, failures = await open_all(spec)
    emit({"ready": True, "connected": len(conns), "failures": failures})
    await wait_go()
    started = time.perf_counter()

    async def client(conn, message: str) -> dict:
        first = None
        final = conn.reply()
        conn.first_chunk = asyncio.get_running_loop().create_future()
        conn.send(wsclient.masked_frame(json.dumps({"content": message, "stream": True}).encode()))
        reply = await final
        if conn.first_chunk.done():
            first = (conn.first_chunk.result() - started) * 1000
        return {"first_ms": first, "total_ms": (time.perf_counter() - started) * 1000,
                "error": b'"type": "error"' in reply}

    results = await asyncio.gather(
        *(client(conn, target["message"]) for conn, target in zip(conns, spec["targets"])))
    for conn in conns:
        conn.close()
    emit({"results": results, "failures": failures})


MODES = {"chat": chat, "idle": idle, "probe": probe, "ask": ask}


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as handle:
        spec = json.load(handle)
    # A hard deadline: whatever happens, this process ends by itself.
    loop = asyncio.new_event_loop()
    loop.call_later(spec.get("max_seconds", 300), os._exit, 3)
    try:
        loop.run_until_complete(MODES[spec["mode"]](spec))
    finally:
        loop.close()


if __name__ == "__main__":
    main()
