"""``pantheon watch``: the state bucket shown live (rich table) or as JSON lines.

The subscription itself is :class:`pantheon_es.watch.StateWatch` (usable from
Python); this module only prints it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

import orjson
from rich.console import Console
from rich.live import Live
from rich.table import Table

from pantheon_es.client import PantheonClient
from pantheon_es.watch import StateChange, StateWatch

#: seconds between redraws of the live table
REDRAW = 0.25


def _status(value: Mapping[str, Any]) -> str:
    if "status" in value:
        return str(value["status"])
    if "pending" in value:  # a mailbox
        return f"{value['pending']} pending, {value['unread']} unread"
    return ""


def _name(value: Mapping[str, Any]) -> str:
    for field in ("name", "hostname"):
        if value.get(field):
            return str(value[field])
    last = value.get("last_message")
    return f"last from {last['sender']} ({last['priority']})" if last else ""


def table(watch: StateWatch, revisions: Mapping[str, int], title: str, rows: int) -> Table:
    """The watched entities, most recently changed first (at most ``rows``)."""
    out = Table(title=title, title_justify="left")
    for column in ("model", "id", "status", "name / detail", "rev"):
        out.add_column(column, overflow="fold")
    keys = sorted(watch.state, key=lambda k: revisions.get(k, 0), reverse=True)
    for key in keys[:rows]:
        _tenant, model, entity_id = key.split(".", 2)
        value = watch.state[key]
        out.add_row(model, entity_id, _status(value), _name(value), str(revisions.get(key, "")))
    if len(keys) > rows:
        out.caption = f"{len(keys) - rows} more not shown"
    return out


def _line(change: StateChange) -> None:
    sys.stdout.write(orjson.dumps(change.to_json()).decode() + "\n")
    sys.stdout.flush()


async def follow(
    client: PantheonClient,
    model: str | None,
    filters: Mapping[str, str],
    *,
    once: bool,
    json_lines: bool,
    console: Console,
) -> int:
    """Print the current values, then (unless ``once``) every change; returns how many."""
    count = 0
    async with StateWatch(
        client.nc, tenant=client.tenant, model=model, filters=filters, subjects=client.subjects
    ) as watch:
        initial = await watch.initial()
        revisions = {c.key: c.revision for c in initial}
        title = f"pantheon-state: tenant {client.tenant}, {model or 'every model'}"
        if json_lines:
            for change in initial:
                _line(change)
            count += len(initial)
            if not once:
                async for change in watch:
                    _line(change)
                    count += 1
            return count
        rows = max(5, console.height - 8)
        if once:
            console.print(table(watch, revisions, title, rows))
            return len(initial)
        # Redrawn at most every REDRAW seconds, and once things go quiet.
        with Live(
            table(watch, revisions, title, rows), console=console, auto_refresh=False
        ) as live:
            drawn, dirty = time.monotonic(), False
            while not watch.closed:
                update = await watch.next(timeout=REDRAW)
                if update is not None:
                    revisions[update.key] = update.revision
                    count += 1
                    dirty = True
                if dirty and (update is None or time.monotonic() - drawn >= REDRAW):
                    live.update(table(watch, revisions, title, rows), refresh=True)
                    drawn, dirty = time.monotonic(), False
    return count
