"""The ``pantheon`` command line.

Conventions (docs/cli.md): every command takes ``--nats-url`` (env
PANTHEON_NATS_URL), ``--data-dir`` (env PANTHEON_DATA_DIR, default
``./.pantheon``) and ``--tenant`` (env PANTHEON_TENANT, default ``default``).
Without a NATS URL a client command finds the ``pantheon up`` running on the
data directory. Commands that read state take ``--json`` and then print one
JSON document on stdout and nothing else. Exit codes: 0 success, 1 a typed
error (its code and message on stderr), 2 bad usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console
from rich.table import Table

from pantheon_es import logs
from pantheon_es.client import PantheonClient, discover
from pantheon_es.errors import PantheonError, UnavailableError

T = TypeVar("T")

app = typer.Typer(
    name="pantheon",
    help=(
        "Pantheon-ES: event-sourced orchestration for AI agents and their tasks.\n\n"
        "Start a node with `pantheon up`, then submit, inspect and cancel tasks from "
        "another terminal. Every change is an event in a NATS JetStream log."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Wide when piped, so ids are never cut short.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

# -- shared options ------------------------------------------------------------------------------

NatsUrl = Annotated[
    str | None,
    typer.Option(
        "--nats-url",
        envvar="PANTHEON_NATS_URL",
        help="NATS server to use. Default: the one of the `pantheon up` running on --data-dir.",
        show_default=False,
    ),
]
DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="PANTHEON_DATA_DIR",
        help="Directory of a node's state (embedded NATS store, read models, discovery file).",
    ),
]
Tenant = Annotated[
    str, typer.Option("--tenant", envvar="PANTHEON_TENANT", help="Tenant to act for.")
]
Root = Annotated[
    str,
    typer.Option(
        "--namespace",
        envvar="PANTHEON_NAMESPACE",
        help="Subject root of the deployment (with --nats-url).",
        hidden=True,
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document and nothing else.")]

DEFAULT_DATA_DIR = Path(".pantheon")


def _actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


def _fail(error: PantheonError) -> typer.Exit:
    err.print(f"[red]error[/red] [bold]{error.code.value}[/bold]: {error.message}", highlight=False)
    if error.details is not None:
        err.print(orjson.dumps(error.details).decode(), highlight=False, soft_wrap=True)
    if error.retry_after is not None:
        err.print(f"retry after {error.retry_after}s", highlight=False)
    return typer.Exit(1)


def _run(coro: Awaitable[T]) -> T:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except PantheonError as error:
        raise _fail(error) from None


async def _client(nats_url: str | None, data_dir: Path, tenant: str, root: str) -> PantheonClient:
    if nats_url is None:
        info = discover(data_dir)
        nats_url, root = info["nats_url"], info.get("root", root)
    return await PantheonClient.connect(nats_url, tenant=tenant, root=root, actor=_actor())


async def _with_client(
    nats_url: str | None,
    data_dir: Path,
    tenant: str,
    root: str,
    fn: Callable[[PantheonClient], Awaitable[T]],
) -> T:
    client = await _client(nats_url, data_dir, tenant, root)
    try:
        return await fn(client)
    finally:
        await client.close()


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{what} {item!r}: use KEY=VALUE")
        result[key] = value
    return result


def tasks_table(items: list[dict[str, Any]]) -> Table:
    """Tasks as a table (``list`` and the demo)."""
    table = Table("NAME", "STATUS", "PRIORITY", "EXECUTOR", "LABELS", "SUBMITTED")
    table.add_column("ID", no_wrap=True, min_width=26)
    for t in items:
        table.add_row(
            t["name"],
            t["status"],
            t["priority_name"],
            t["executor_kind"],
            ",".join(f"{k}={v}" for k, v in t["labels"].items()),
            t["submitted_at"][:19].replace("T", " "),
            t["id"],
        )
    return table


# -- up --------------------------------------------------------------------------------------------


@app.command()
def up(
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    root: Root = "pantheon",
    sync_interval: Annotated[
        str | None,
        typer.Option(
            help="Embedded server's fsync policy: 'always', or an interval like 2m "
            "(default: the shipped config's, 2m).",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run a node: embedded nats-server (unless --nats-url), command service, projector, queries.

    Stops cleanly on Ctrl-C or SIGTERM and leaves no nats-server behind.
    """
    from pantheon_es.node import Node, NodeConfig

    logs.configure(log_level)
    config = NodeConfig(
        data_dir=data_dir, nats_url=nats_url, root=root, sync_interval=sync_interval
    )

    async def main() -> None:
        node = Node(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.request_stop)
        async with node:
            err.print(
                f"[green]pantheon up[/green]: NATS {node.nats_url}  data {data_dir.resolve()}\n"
                "  try: pantheon submit hello -- echo hi   |   pantheon list   |   Ctrl-C to stop",
                highlight=False,
            )
            await node.run()

    _run(main())


# -- tasks -----------------------------------------------------------------------------------------


@app.command()
def submit(
    name: Annotated[str, typer.Argument(help="A name for the task.")],
    argv: Annotated[
        list[str] | None,
        typer.Argument(help="Command to run (shell executor), after `--`.", show_default=False),
    ] = None,
    python: Annotated[
        str | None, typer.Option(help="Python executor target 'package.module:function'.")
    ] = None,
    kwargs: Annotated[
        str | None, typer.Option(help="JSON object of keyword arguments for --python.")
    ] = None,
    executor: Annotated[
        str | None, typer.Option(help="Full executor spec as JSON (see `pantheon schema`).")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="KEY=VALUE for a shell task.")
    ] = None,
    cwd: Annotated[str | None, typer.Option(help="Working directory of a shell task.")] = None,
    priority: Annotated[str, typer.Option(help="low|medium|high|urgent or 0..1000.")] = "medium",
    cpu: Annotated[float | None, typer.Option(help="CPU cores requested.")] = None,
    memory_mb: Annotated[int | None, typer.Option(help="Memory requested, MiB.")] = None,
    gpu: Annotated[int | None, typer.Option(help="GPUs requested.")] = None,
    resource: Annotated[
        list[str] | None, typer.Option("--resource", help="Custom resource NAME=AMOUNT.")
    ] = None,
    label: Annotated[list[str] | None, typer.Option("--label", help="Label KEY=VALUE.")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Submitting again with this key returns the same task.")
    ] = None,
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Submit a task; prints its id.

    Examples: `pantheon submit build -- make all`,
    `pantheon submit score --python mypkg.jobs:score --kwargs '{"n": 3}'`.
    """
    chosen = [x for x in (argv, python, executor) if x]
    if len(chosen) != 1:
        raise typer.BadParameter("give exactly one of: a command after `--`, --python, --executor")
    spec: dict[str, Any]
    if executor:
        try:
            spec = orjson.loads(executor)
        except orjson.JSONDecodeError as exc:
            raise typer.BadParameter(f"--executor is not JSON: {exc}") from None
    elif python:
        spec = {"kind": "python", "target": python}
        if kwargs:
            try:
                spec["kwargs"] = orjson.loads(kwargs)
            except orjson.JSONDecodeError as exc:
                raise typer.BadParameter(f"--kwargs is not JSON: {exc}") from None
    else:
        spec = {"kind": "shell", "argv": list(argv or [])}
        if env:
            spec["env"] = _pairs(env, "--env")
        if cwd:
            spec["cwd"] = cwd
    resources: dict[str, Any] = {}
    if cpu is not None:
        resources["cpu"] = cpu
    if memory_mb is not None:
        resources["memory_mb"] = memory_mb
    if gpu is not None:
        resources["gpu"] = gpu
    if resource:
        try:
            resources["custom"] = {k: float(v) for k, v in _pairs(resource, "--resource").items()}
        except ValueError as exc:
            raise typer.BadParameter(f"--resource amount must be a number: {exc}") from None
    prio: str | int = int(priority) if priority.isdigit() else priority

    result = _run(
        _with_client(
            nats_url,
            data_dir,
            tenant,
            root,
            lambda c: c.submit_task(
                name,
                spec,
                priority=prio,
                resources=resources or None,
                labels=_pairs(label, "--label") or None,
                idempotency_key=idempotency_key,
            ),
        )
    )
    if json_out:
        _print_json({"id": result["task_id"]})
    else:
        print(result["task_id"])


@app.command()
def cancel(
    task_id: Annotated[str, typer.Argument(help="Task id.")],
    reason: Annotated[str | None, typer.Option(help="Why; recorded in the event.")] = None,
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Cancel a task that has not finished (cancelling twice is not an error)."""
    result = _run(
        _with_client(nats_url, data_dir, tenant, root, lambda c: c.cancel_task(task_id, reason))
    )
    if json_out:
        _print_json(result)
    else:
        print(f"{result['task_id']} {result['status']}")


@app.command()
def status(
    task_id: Annotated[str, typer.Argument(help="Task id.")],
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Show one task's current state."""
    task = _run(_with_client(nats_url, data_dir, tenant, root, lambda c: c.get_task(task_id)))
    if json_out:
        _print_json(task)
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in task.items():
        shown = orjson.dumps(value).decode() if isinstance(value, dict | list) else str(value)
        table.add_row(key, "-" if value is None else shown)
    out.print(table)


@app.command("list")
def list_(
    status_: Annotated[
        list[str] | None, typer.Option("--status", help="Only tasks in this status (repeatable).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Only tasks with this name.")] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="KEY=VALUE that must match.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Page size.")] = 20,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many tasks.")] = 0,
    oldest_first: Annotated[bool, typer.Option(help="Oldest first (default newest).")] = False,
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """List tasks, newest first, a page at a time."""
    filters: dict[str, Any] = {
        "status": status_ or None,
        "name": name,
        "labels": _pairs(label, "--label") or None,
        "limit": limit,
        "offset": offset,
        "order": "oldest" if oldest_first else "newest",
    }
    page = _run(_with_client(nats_url, data_dir, tenant, root, lambda c: c.list_tasks(**filters)))
    if json_out:
        _print_json(page)
        return
    out.print(tasks_table(page["items"]))
    out.print(
        f"page {page['current_page']} of {page['total_pages']}, {page['total']} task(s)"
        + ("; more with --offset" if page["has_more"] else ""),
        highlight=False,
    )


# -- events ----------------------------------------------------------------------------------------


@app.command()
def events(
    from_seq: Annotated[int, typer.Option(min=1, help="First stream sequence to show.")] = 1,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events.")
    ] = False,
    json_out: Annotated[
        bool,
        typer.Option("--json", help="A JSON array (with --follow: one JSON object per line)."),
    ] = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Print the tenant's events from the log, oldest first."""
    from pantheon_es.events import decode
    from pantheon_es.store import EventStore

    collected: list[dict[str, Any]] = []

    def show(seq: int, payload: bytes) -> None:
        ev = decode(payload, seq)
        doc = {"seq": seq, **ev.model_dump(mode="json")}
        if json_out and not follow:
            collected.append(doc)
        elif json_out:
            sys.stdout.write(orjson.dumps(doc).decode() + "\n")
            sys.stdout.flush()
        else:
            at = ev.occurred_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
            out.print(
                f"{seq:>8}  {at}  [bold]{ev.type:<16}[/bold] {ev.aggregate}/{ev.aggregate_id}  "
                f"{ev.actor}  {orjson.dumps(ev.data.model_dump(mode='json')).decode()}",
                highlight=False,
                soft_wrap=True,
            )

    async def main(client: PantheonClient) -> None:
        store = EventStore(client.nc, client.subjects)
        subject = client.subjects.events(client.tenant)
        last = await store.subject_last_seq(subject)
        if not follow and last < from_seq:
            return
        async with store.feed(from_seq=from_seq, subject=subject) as feed:
            while True:
                batch = await feed.next_batch(1000)
                for raw in batch:
                    if not follow and raw.seq > last:
                        return
                    show(raw.seq, raw.data)
                    if not follow and raw.seq >= last:
                        return

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends --follow
        _run(_with_client(nats_url, data_dir, tenant, root, main))
    if json_out and not follow:
        _print_json(collected)


# -- demo -----------------------------------------------------------------------------------------


@app.command()
def demo(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir", help="Keep the demo's state here (default: a temporary directory)."
        ),
    ] = None,
) -> None:
    """A tour of the foundation on an embedded nats-server; cleans up after itself."""
    from pantheon_es.demo import run_demo

    logs.configure("warning")
    if not _run(run_demo(out, data_dir)):
        raise typer.Exit(1)


# -- schema ----------------------------------------------------------------------------------------


@app.command()
def schema(
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write to this file instead of stdout.")
    ] = None,
) -> None:
    """Print the JSON Schema of every command, query, event and reply."""
    from pantheon_es.schema import export

    doc = orjson.dumps(export(), option=orjson.OPT_INDENT_2).decode() + "\n"
    if out_file:
        out_file.write_text(doc)
        err.print(f"wrote {out_file}", highlight=False)
    else:
        sys.stdout.write(doc)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except UnavailableError as error:  # raised outside _run (e.g. discovery)
        _fail(error)
        sys.exit(1)


if __name__ == "__main__":
    main()
