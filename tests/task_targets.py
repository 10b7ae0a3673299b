"""Python task targets the test-suite submits (``tests.task_targets:<name>``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any


def add(a: int, b: int) -> int:
    return a + b


def noop() -> None:
    return None


async def sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


def blocking_sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def fail(message: str = "boom") -> None:
    raise RuntimeError(message)


async def chat(ctx: Any, to: str | None = None, expect: int = 0) -> dict[str, Any]:
    """Report progress, optionally message ``to``, read ``expect`` messages."""
    await ctx.progress(0.5, "half way")
    sent = await ctx.send(to, "hello from python", "high", "update") if to else None
    received: list[dict[str, Any]] = []
    while len(received) < expect:
        received += await ctx.inbox(10, 10.0)
    await ctx.heartbeat()
    return {"sent": sent, "received": [m["body"] for m in received]}


def flaky(path: str, failures: int) -> int:
    """Fail the first ``failures`` calls (counted in the file at ``path``), then succeed."""
    from pathlib import Path

    counter = Path(path)
    calls = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(calls))
    if calls <= failures:
        raise RuntimeError(f"call {calls} fails")
    return calls


def emit(value: Any) -> Any:
    return value


def total(inputs: dict[str, Any]) -> Any:
    """A fan-in: the sum of the dependencies' results (a workflow passes ``inputs``)."""
    return sum(inputs.values())
