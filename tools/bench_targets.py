"""Python task targets used by ``tools.bench_tasks`` (run on workers)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson


def noop() -> None:
    """The no-op task of the throughput and latency runs."""
    return None


async def ping_sender(ctx: Any, to: str, count: int, gap: float = 0.02) -> int:
    """Send ``count`` messages to ``to``, each stamped with its send time."""
    for i in range(count):
        await ctx.send(to, orjson.dumps({"i": i, "sent": time.time()}).decode(), "high", "update")
        await asyncio.sleep(gap)
    return count


async def ping_receiver(ctx: Any, count: int, timeout: float = 60.0) -> list[float]:
    """Receive ``count`` messages; the delivery latency of each, in seconds."""
    latencies: list[float] = []
    deadline = time.monotonic() + timeout
    while len(latencies) < count and time.monotonic() < deadline:
        for message in await ctx.inbox(10, 5.0):
            latencies.append(time.time() - orjson.loads(message["body"])["sent"])
    return latencies
