"""The ``pantheon`` command line.

Conventions (../shared/DESIGN.md, "CLI conventions"): every command takes
``--nats-url`` (env PANTHEON_NATS_URL), ``--data-dir`` (env PANTHEON_DATA_DIR,
default ``./.pantheon``) and ``--tenant`` (env PANTHEON_TENANT, default
``default``; on the audit tools ``replay``, ``verify``, ``whatif`` and ``snapshot``
the default is ``*``, every tenant: docs/decisions.md).
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
from pantheon_es.gc_tuning import tune_gc

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
#: --tenant of the tools that read the whole log (replay, verify, whatif, snapshot): every
#: tenant unless one is named, here or by PANTHEON_TENANT (docs/decisions.md).
TenantScope = Annotated[
    str,
    typer.Option(
        "--tenant",
        envvar="PANTHEON_TENANT",
        metavar="TENANT|'*'",
        help="Only this tenant ('*': every tenant). PANTHEON_TENANT, when set, narrows too: "
        "pass --tenant '*' to cover every tenant anyway.",
    ),
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
#: How long the read side of `pantheon up` lets a small batch wait for more events (a
#: write per event on a 2-core host slows the command path; docs/decisions.md).
DEFAULT_LINGER = 0.01

# -- scheduling options of submit and spawn --------------------------------------------------------
_SCHED = "Scheduling"
FairnessKey = Annotated[
    str | None,
    typer.Option(help="Share fairly with the tenant's other keys (e.g. a customer id).",
                 rich_help_panel=_SCHED),
]  # fmt: skip
ConcurrencyKey = Annotated[
    str | None,
    typer.Option(help="Limit how many tasks with this key run at once.", rich_help_panel=_SCHED),
]
ConcurrencyLimit = Annotated[
    int | None,
    typer.Option(min=1, help="The limit for --concurrency-key (default: the node's).",
                 rich_help_panel=_SCHED),
]  # fmt: skip
RetryAttempts = Annotated[
    int | None,
    typer.Option(min=1, help="Retry failures: attempts in all (enables the retry policy).",
                 rich_help_panel=_SCHED),
]  # fmt: skip
RetryInitial = Annotated[
    float, typer.Option(min=0, help="Seconds before the first retry.", rich_help_panel=_SCHED)
]
RetryBackoff = Annotated[
    float, typer.Option(min=1, help="Each retry waits this much longer.", rich_help_panel=_SCHED)
]
RetryMaxInterval = Annotated[
    float, typer.Option(min=0, help="Longest wait between retries, s.", rich_help_panel=_SCHED)
]
NonRetryable = Annotated[
    list[str] | None,
    typer.Option("--non-retryable", help="Error type that is never retried (repeatable).",
                 rich_help_panel=_SCHED),
]  # fmt: skip
ScheduleToStart = Annotated[
    float | None,
    typer.Option(min=0, help="Time out if not started within this many seconds.",
                 rich_help_panel=_SCHED),
]  # fmt: skip
StartToClose = Annotated[
    float | None,
    typer.Option(min=0, help="An attempt may run this many seconds (then retried or timed out).",
                 rich_help_panel=_SCHED),
]  # fmt: skip
HeartbeatTimeout = Annotated[
    float | None,
    typer.Option(min=0.5, help="Lease expires this long after the last heartbeat, s.",
                 rich_help_panel=_SCHED),
]  # fmt: skip


def _scheduling(
    fairness_key: str | None,
    concurrency_key: str | None,
    concurrency_limit: int | None,
    retry_max_attempts: int | None,
    retry_initial: float,
    retry_backoff: float,
    retry_max_interval: float,
    non_retryable: list[str] | None,
    schedule_to_start: float | None,
    start_to_close: float | None,
    heartbeat_timeout: float | None,
) -> dict[str, Any]:
    """The SchedulingOptions fields the user set, for the command body."""
    options: dict[str, Any] = {
        "fairness_key": fairness_key,
        "concurrency_key": concurrency_key,
        "concurrency_limit": concurrency_limit,
        "schedule_to_start_timeout": schedule_to_start,
        "start_to_close_timeout": start_to_close,
        "heartbeat_timeout": heartbeat_timeout,
    }
    if retry_max_attempts is not None:
        options["retry"] = {
            "max_attempts": retry_max_attempts,
            "initial_interval": retry_initial,
            "backoff_coefficient": retry_backoff,
            "max_interval": retry_max_interval,
            "non_retryable": non_retryable or [],
        }
    elif non_retryable:
        raise typer.BadParameter("--non-retryable needs --retry-max-attempts")
    return {k: v for k, v in options.items() if v is not None}


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


async def _with_log(
    nats_url: str | None,
    data_dir: Path,
    tenant: str,
    root: str,
    fn: Callable[[PantheonClient], Awaitable[T]],
    *,
    queries: bool = False,
) -> T:
    """Like :func:`_with_client`, for the read-only tools: with no node running on
    ``data_dir`` but its embedded store there, they read that log through a nats-server
    started for the command (no command service, no scheduler: nothing is appended).
    ``queries``: also run a read side, caught up first, for tools that use the read
    models (docs/operations.md)."""
    if nats_url is None and (data_dir / "nats" / "store").is_dir():
        try:
            info = discover(data_dir)
        except UnavailableError:
            return await _offline(data_dir, tenant, root, fn, queries=queries)
        nats_url, root = info["nats_url"], info.get("root", root)
    return await _with_client(nats_url, data_dir, tenant, root, fn)


async def _offline(
    data_dir: Path,
    tenant: str,
    root: str,
    fn: Callable[[PantheonClient], Awaitable[T]],
    *,
    queries: bool,
) -> T:
    from pantheon_es.embedded import EmbeddedNats
    from pantheon_es.node import DB_NAME
    from pantheon_es.store import EventStore
    from pantheon_es.subjects import Subjects
    from projections.runner import ReadSide

    logs.configure("warning")
    err.print(
        f"no running `pantheon up` in {data_dir}: reading its log through a nats-server "
        "started for this command (nothing is appended)",
        highlight=False,
    )
    async with EmbeddedNats(data_dir / "nats") as server:
        client = await PantheonClient.connect(server.url, tenant=tenant, root=root, actor=_actor())
        read: ReadSide | None = None
        serving: asyncio.Task[None] | None = None
        try:
            if queries:
                read = ReadSide(EventStore(client.nc, Subjects(root)), data_dir / DB_NAME)
                await read.start()
                await read.projector.catch_up()
                serving = asyncio.create_task(read.run())
            return await fn(client)
        finally:
            if read is not None:
                await read.shutdown()
            if serving is not None:
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await serving
            await client.close()


def _served(tenants: list[str] | None) -> tuple[str, ...]:
    """``--worker-serve-tenant`` values, checked before any worker starts."""
    from pantheon_es.subjects import check_token

    try:
        return tuple(t if t == "*" else check_token("tenant", t) for t in tenants or ())
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--worker-serve-tenant") from None


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
    workers: Annotated[
        int, typer.Option(min=0, help="Worker processes to start and supervise (0: none).")
    ] = 2,
    worker_slots: Annotated[
        int, typer.Option(min=1, help="Tasks each local worker runs at once.")
    ] = 16,
    worker_serve_tenant: Annotated[
        list[str] | None,
        typer.Option(
            "--worker-serve-tenant",
            help="The local workers also run tasks of this tenant ('*': every tenant); "
            "repeatable. Tenants share them by fair-share weight.",
        ),
    ] = None,
    lease_ttl: Annotated[
        float, typer.Option(min=0.5, help="Seconds a lease lives without a heartbeat.")
    ] = 30.0,
    inactivity_timeout: Annotated[
        float,
        typer.Option(min=0, help="Default inactivity timeout of running tasks, minutes (0: none)."),
    ] = 30.0,
    retention: Annotated[
        float | None,
        typer.Option(min=0, help="Archive finished tasks this many minutes after they finish."),
    ] = None,
    aging: Annotated[
        float,
        typer.Option(
            min=0.0001,
            help="Priority points a waiting task gains per second.",
            rich_help_panel="Scheduling policy",
        ),
    ] = 1.0,
    max_running_agents: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Agents running at once, all tenants together.",
            rich_help_panel="Scheduling policy",
        ),
    ] = None,
    concurrency_limit: Annotated[
        list[str] | None,
        typer.Option(
            "--concurrency-limit",
            help="KEY=N: at most N tasks with that concurrency key run at once (repeatable).",
            rich_help_panel="Scheduling policy",
        ),
    ] = None,
    max_running_per_tenant: Annotated[
        int | None,
        typer.Option(
            min=1, help="Tasks one tenant may run at once.", rich_help_panel="Scheduling policy"
        ),
    ] = None,
    max_pending_per_tenant: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Pending tasks per tenant; past it a submit gets 'overloaded'.",
            rich_help_panel="Scheduling policy",
        ),
    ] = 100_000,
    unschedulable: Annotated[
        str,
        typer.Option(
            help="A request no registered worker could hold: 'reject' the submit "
            "(unschedulable) or 'block' it until a big enough worker joins.",
            rich_help_panel="Scheduling policy",
        ),
    ] = "reject",
    tenant_weight: Annotated[
        list[str] | None,
        typer.Option(
            "--tenant-weight",
            help="TENANT=W: fair-share weight (default 1).",
            rich_help_panel="Scheduling policy",
        ),
    ] = None,
    fairness_weight: Annotated[
        list[str] | None,
        typer.Option(
            "--fairness-weight",
            help="KEY=W: weight of a fairness key (default 1).",
            rich_help_panel="Scheduling policy",
        ),
    ] = None,
    leader_ttl: Annotated[
        float,
        typer.Option(
            min=0,
            help="Scheduler leadership lease, seconds: with several nodes on "
            "one NATS one schedules, the others stand by (0: no election).",
        ),
    ] = 5.0,
    snapshot_every: Annotated[
        int,
        typer.Option(
            min=0,
            help="Snapshot the read models into JetStream every N events applied, so a "
            "restart with an empty data dir restores it and replays only the rest (0: off; "
            "see `pantheon snapshot`).",
        ),
    ] = 0,
    read_linger: Annotated[
        float,
        typer.Option(
            min=0,
            max=1,
            help="Seconds the read side lets a small batch wait for more events before it "
            "writes it, unless a query waits for it (0: write at once; fewer, larger "
            "transactions under load).",
        ),
    ] = DEFAULT_LINGER,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run a node: NATS, command service, projections, scheduler and local workers.

    Starts an embedded nats-server unless --nats-url joins an existing one. Stops cleanly on
    Ctrl-C or SIGTERM (workers hand back what they run) and leaves no nats-server or worker
    behind.
    """
    from pantheon_es.node import Node, NodeConfig
    from pantheon_es.placement import Policy, Quota
    from pantheon_es.scheduler import SchedulerConfig

    try:
        policy = Policy(
            aging_per_s=aging,
            max_running_agents=max_running_agents,
            concurrency_limits={
                k: int(v) for k, v in _pairs(concurrency_limit, "--concurrency-limit").items()
            },
            default_quota=Quota(max_running_per_tenant, max_pending_per_tenant),
            unschedulable=unschedulable,
            tenant_weights={
                k: float(v) for k, v in _pairs(tenant_weight, "--tenant-weight").items()
            },
            fairness_weights={
                k: float(v) for k, v in _pairs(fairness_weight, "--fairness-weight").items()
            },
        )
    except ValueError as exc:
        raise typer.BadParameter(f"bad scheduling policy: {exc}") from None
    logs.configure(log_level)
    config = NodeConfig(
        data_dir=data_dir,
        nats_url=nats_url,
        root=root,
        sync_interval=sync_interval,
        read_side="process",
        workers=workers,
        worker_slots=worker_slots,
        worker_serve_tenants=_served(worker_serve_tenant),
        scheduler=SchedulerConfig(
            lease_ttl=lease_ttl, inactivity_timeout=inactivity_timeout * 60, policy=policy
        ),
        retention=retention * 60 if retention is not None else None,
        leader_ttl=leader_ttl,
        snapshot_every=snapshot_every or None,
        read_linger=read_linger,
    )

    async def main() -> None:
        node = Node(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.request_stop)
        async with node:
            err.print(
                f"[green]pantheon up[/green]: NATS {node.nats_url}  data {data_dir.resolve()}\n"
                f"  {workers} local worker(s); try: pantheon spawn 'hello'  |  "
                "pantheon monitor  |  Ctrl-C to stop",
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
    inactivity_timeout: Annotated[
        float | None,
        typer.Option(min=0, help="Minutes without activity before it times out (0: never)."),
    ] = None,
    max_attempts: Annotated[
        int | None, typer.Option(min=1, help="Leases it may lose (worker died) before it fails.")
    ] = None,
    fairness_key: FairnessKey = None,
    concurrency_key: ConcurrencyKey = None,
    concurrency_limit: ConcurrencyLimit = None,
    retry_max_attempts: RetryAttempts = None,
    retry_initial: RetryInitial = 1.0,
    retry_backoff: RetryBackoff = 2.0,
    retry_max_interval: RetryMaxInterval = 100.0,
    non_retryable: NonRetryable = None,
    schedule_to_start: ScheduleToStart = None,
    start_to_close: StartToClose = None,
    heartbeat_timeout: HeartbeatTimeout = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until it finishes and print its final state.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="With --wait: give up after this many seconds.")
    ] = 3600,
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Submit a task; prints its id (with --wait, its final state).

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
    options = _scheduling(
        fairness_key, concurrency_key, concurrency_limit, retry_max_attempts, retry_initial,
        retry_backoff, retry_max_interval, non_retryable, schedule_to_start, start_to_close,
        heartbeat_timeout,
    )  # fmt: skip

    async def go(c: PantheonClient) -> dict[str, Any]:
        result = await c.submit_task(
            name,
            spec,
            priority=prio,
            resources=resources or None,
            labels=_pairs(label, "--label") or None,
            idempotency_key=idempotency_key,
            inactivity_timeout=inactivity_timeout * 60 if inactivity_timeout is not None else None,
            max_attempts=max_attempts,
            options=options,
        )
        if wait:
            return await c.wait_for_task(result["task_id"], timeout=timeout)
        return result

    result = _run(_with_client(nats_url, data_dir, tenant, root, go))
    if wait:
        _show_finished(result, json_out)
    elif json_out:
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


WHY_TEXT = {
    "quota": "its tenant runs as many tasks as its quota allows",
    "agent_limit": "the limit on running agents is reached",
    "concurrency_key_full": "its concurrency key is at its limit",
    "no_worker_fits": "no registered worker could hold its resource request",
    "waiting_for_capacity": "it is at the front and holds a worker until enough is free there",
    "waiting_for_retry": "an attempt failed; the retry policy waits before the next",
    "dependency_unmet": "a task it depends on has not completed",
}


@app.command()
def why(
    task_id: Annotated[str, typer.Argument(help="Task or agent id.")],
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Why is this task where it is? The recorded reason (TaskBlocked, retries) and the
    scheduler's live view: effective priority, what it waits for, tasks ahead of it."""
    info = _run(_with_client(nats_url, data_dir, tenant, root, lambda c: c.why(task_id)))
    if json_out:
        _print_json(info)
        return
    status, live = info["status"], info["scheduler"] or {}
    out.print(f"[bold]{task_id}[/bold] is [bold]{status}[/bold]", highlight=False)
    reason = live.get("reason") or info.get("blocked_reason")
    if status != "pending":
        if live.get("worker_id"):
            out.print(f"  placed on worker {live['worker_id']}", highlight=False)
        if info.get("error"):
            err_ = info["error"]
            out.print(f"  error: {err_.get('type')}: {err_.get('message', '')}", highlight=False)
        return
    if reason:
        out.print(f"  blocked: [yellow]{reason}[/yellow] - {WHY_TEXT.get(reason, '')}",
                  highlight=False)  # fmt: skip
        details = info.get("blocked_details") or {}
        if details:
            out.print(f"  details: {orjson.dumps(details).decode()}", highlight=False)
    elif live.get("state") == "ready":
        out.print(
            f"  waiting for capacity: {live.get('ahead_in_group', 0)} task(s) of its group "
            "are ahead of it",
            highlight=False,
        )
    if info.get("not_before"):
        out.print(f"  next attempt not before {info['not_before']}", highlight=False)
    if "effective_priority" in live:
        out.print(
            f"  priority {info['priority']}, effective now {live['effective_priority']} (aging)",
            highlight=False,
        )
    if live.get("workers") == 0:
        out.print("  no worker is registered for this tenant", highlight=False)
    if not info["scheduler"]:
        out.print("  (no scheduler answered: the live view is missing)", highlight=False)


@app.command()
def redrive(
    task_id: Annotated[str, typer.Argument(help="A failed or timed-out task's id.")],
    reason: Annotated[str | None, typer.Option(help="Why (recorded in the event).")] = None,
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Run a failed or timed-out task again (re-drive from the dead-letter queue)."""
    result = _run(
        _with_client(nats_url, data_dir, tenant, root, lambda c: c.redrive_task(task_id, reason))
    )
    if json_out:
        _print_json(result)
    else:
        print(f"{task_id} {result['status']}")


@app.command("list")
def list_(
    status_: Annotated[
        list[str] | None, typer.Option("--status", help="Only tasks in this status (repeatable).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Only tasks with this name.")] = None,
    kind: Annotated[
        str | None, typer.Option(help="agent: only agents; task: only non-agent tasks.")
    ] = None,
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
        "kind": kind,
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
    summary = page.get("summary", {})
    out.print(
        f"page {page['current_page']} of {page['total_pages']}, {page['total']} task(s)"
        + ("; more with --offset" if page["has_more"] else "")
        + f"  |  live: {summary.get('active', 0)} active, "
        f"{summary.get('waiting_for_input', 0)} waiting for input, {summary.get('idle', 0)} idle",
        highlight=False,
    )


def _show_finished(task: dict[str, Any], json_out: bool) -> None:
    if json_out:
        _print_json(task)
        return
    line = f"{task['id']} {task['status']}"
    if task.get("duration_s") is not None:
        line += f" in {task['duration_s']:.3f}s"
    print(line)
    if task.get("result") is not None:
        print(orjson.dumps(task["result"]).decode())
    if task.get("error"):
        err.print(f"{task['error']['type']}: {task['error']['message']}", highlight=False)


# -- agents --------------------------------------------------------------------------------------


@app.command()
def spawn(
    prompt: Annotated[str, typer.Argument(help="What the agent is to do.")],
    file: Annotated[
        list[str] | None, typer.Option("--file", help="A file for the agent (repeatable).")
    ] = None,
    delegate: Annotated[
        list[str] | None,
        typer.Option("--delegate", help="An agent it may delegate to (repeatable)."),
    ] = None,
    template: Annotated[
        str | None,
        typer.Option(help="Agent command template (default: the built-in offline agent)."),
    ] = None,
    name: Annotated[str, typer.Option(help="A name for the agent.")] = "agent",
    priority: Annotated[str, typer.Option(help="low|medium|high|urgent or 0..1000.")] = "medium",
    label: Annotated[list[str] | None, typer.Option("--label", help="Label KEY=VALUE.")] = None,
    inactivity_timeout: Annotated[
        float | None, typer.Option(min=0, help="Minutes without activity before it times out.")
    ] = None,
    fairness_key: FairnessKey = None,
    concurrency_key: ConcurrencyKey = None,
    concurrency_limit: ConcurrencyLimit = None,
    retry_max_attempts: RetryAttempts = None,
    retry_initial: RetryInitial = 1.0,
    retry_backoff: RetryBackoff = 2.0,
    retry_max_interval: RetryMaxInterval = 100.0,
    non_retryable: NonRetryable = None,
    schedule_to_start: ScheduleToStart = None,
    start_to_close: StartToClose = None,
    heartbeat_timeout: HeartbeatTimeout = None,
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Spawn an agent with a prompt, files and delegates; prints the agent's id."""
    prio: str | int = int(priority) if priority.isdigit() else priority
    options = _scheduling(
        fairness_key, concurrency_key, concurrency_limit, retry_max_attempts, retry_initial,
        retry_backoff, retry_max_interval, non_retryable, schedule_to_start, start_to_close,
        heartbeat_timeout,
    )  # fmt: skip
    result = _run(
        _with_client(
            nats_url,
            data_dir,
            tenant,
            root,
            lambda c: c.spawn_agent(
                prompt,
                files=file,
                delegates=delegate,
                template=template,
                name=name,
                priority=prio,
                labels=_pairs(label, "--label") or None,
                inactivity_timeout=inactivity_timeout * 60
                if inactivity_timeout is not None
                else None,
                options=options,
            ),
        )
    )
    if json_out:
        _print_json({"id": result["agent_id"]})
    else:
        print(result["agent_id"])


@app.command()
def monitor(
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Agents at a glance: totals by status, and each agent's task, status and times."""
    view = _run(_with_client(nats_url, data_dir, tenant, root, lambda c: c.monitor()))
    if json_out:
        _print_json(view)
        return
    totals = ", ".join(f"{n} {s}" for s, n in view["totals"].items() if n)
    out.print(f"{view['total']} agent(s)" + (f": {totals}" if totals else ""), highlight=False)
    table = Table("STATUS", "ACTIVITY", "TASK", "STARTED", "LAST ACTIVITY", "DURATION", "MSGS")
    table.add_column("AGENT", no_wrap=True, min_width=26)
    for a in view["agents"]:
        table.add_row(
            a["status"],
            a["activity"] or "-",
            (a["task"] or "")[:60],
            (a["started_at"] or "-")[:19].replace("T", " "),
            (a["last_activity_at"] or "-")[:19].replace("T", " "),
            f"{a['duration_s']:.1f}s" if a["duration_s"] is not None else "-",
            str(a["pending_messages"]),
            a["agent_id"],
        )
    out.print(table)


@app.command()
def send(
    agent_id: Annotated[str, typer.Argument(help="The recipient agent (task) id.")],
    message: Annotated[str, typer.Argument(help="The message.")],
    priority: Annotated[str, typer.Option(help="low|medium|high|urgent")] = "medium",
    type_: Annotated[
        str, typer.Option("--type", help="instruction|query|update|coordination|status_request")
    ] = "update",
    sender: Annotated[
        str | None,
        typer.Option(envvar="PANTHEON_TASK_ID", help="Who sends it (inside an agent: its own id)."),
    ] = None,
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Send a message to an agent; pending messages are delivered highest priority first."""
    result = _run(
        _with_client(
            nats_url,
            data_dir,
            tenant,
            root,
            lambda c: c.send_message(
                agent_id, message, priority=priority, type=type_, sender=sender
            ),
        )
    )
    if json_out:
        _print_json(result)
    else:
        print(result["message_id"])


@app.command()
def inbox(
    agent_id: Annotated[
        str | None,
        typer.Argument(envvar="PANTHEON_TASK_ID", help="Whose inbox (inside an agent: its own)."),
    ] = None,
    max_: Annotated[
        int, typer.Option("--max", min=1, max=100, help="Messages to take at most.")
    ] = 10,
    wait: Annotated[
        bool, typer.Option("--wait", help="Block until a message arrives (see --timeout).")
    ] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: seconds to wait at most.")] = 300.0,
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Take an agent's pending messages (delivered and marked read), highest priority first."""
    if not agent_id:
        raise typer.BadParameter("give the agent id (or run inside an agent: PANTHEON_TASK_ID)")
    messages = _run(
        _with_client(
            nats_url,
            data_dir,
            tenant,
            root,
            lambda c: c.receive_messages(
                agent_id, max=max_, ack=True, wait=timeout if wait else None
            ),
        )
    )
    if json_out:
        _print_json(messages)
        return
    for m in messages:
        out.print(
            f"[bold]{m['priority']:>6}[/bold] {m['type']:<14} from {m['sender']}  {m['sent_at']}\n"
            f"  {m['body']}",
            highlight=False,
        )
    if not messages:
        err.print("no messages", highlight=False)


@app.command()
def cleanup(
    older_than: Annotated[
        float, typer.Option(min=0, help="Archive tasks finished more than this many minutes ago.")
    ],
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Archive finished (completed, failed, cancelled, timed out) tasks; the log keeps them."""
    result = _run(_with_client(nats_url, data_dir, tenant, root, lambda c: c.cleanup(older_than)))
    if json_out:
        _print_json(result)
    else:
        print(f"archived {result['archived']} task(s)")


@app.command("workers")
def workers_(
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Registered workers: status, capacity, running tasks, resource use."""
    page = _run(_with_client(nats_url, data_dir, tenant, root, lambda c: c.list_workers()))
    if json_out:
        _print_json(page)
        return
    table = Table(
        "WORKER", "STATUS", "CPU", "MEMORY", "SLOTS", "RUNNING", "CPU%", "RSS MB", "LAST SEEN"
    )
    for w in page["items"]:
        table.add_row(
            w["id"],
            w["status"],
            f"{w['capacity']['cpu']:g}",
            str(w["capacity"]["memory_mb"]),
            str(w["slots"]),
            str(w["running"]),
            "-" if w["cpu_percent"] is None else f"{w['cpu_percent']:.0f}",
            "-" if w["memory_mb"] is None else f"{w['memory_mb']:.0f}",
            w["last_heartbeat_at"][:19].replace("T", " "),
        )
    out.print(table)


@app.command()
def worker(
    worker_id: Annotated[
        str | None, typer.Option(help="Worker id (default: <host>-<random>); one process per id.")
    ] = None,
    cpu: Annotated[float | None, typer.Option(help="CPU cores offered (default: all).")] = None,
    memory_mb: Annotated[
        int | None, typer.Option(help="Memory offered, MiB (default: all).")
    ] = None,
    gpu: Annotated[int, typer.Option(help="GPUs offered.")] = 0,
    resource: Annotated[
        list[str] | None, typer.Option("--resource", help="Custom resource NAME=AMOUNT offered.")
    ] = None,
    slots: Annotated[int, typer.Option(min=1, help="Tasks it runs at once.")] = 16,
    label: Annotated[list[str] | None, typer.Option("--label", help="Label KEY=VALUE.")] = None,
    ttl: Annotated[
        float, typer.Option(min=1, help="Declared lost this long after its last heartbeat.")
    ] = 15.0,
    shutdown_timeout: Annotated[
        float, typer.Option(help="On SIGTERM/Ctrl-C: seconds to let running tasks finish.")
    ] = 30.0,
    serve_tenant: Annotated[
        list[str] | None,
        typer.Option(
            "--serve-tenant",
            help="Also run tasks of this tenant ('*': every "
            "tenant); repeatable. Tenants then share it by fair-share weight.",
        ),
    ] = None,
    agent_template: Annotated[
        list[str] | None,
        typer.Option(
            help="Agent command template NAME=JSON-argv, "
            'e.g. claude=\'["claude", "-p", "{prompt}"]\'.'
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Run a worker: register capacity, take offers, run tasks, report; Ctrl-C drains."""
    from pantheon_es.worker import Worker, WorkerConfig, default_capacity

    logs.configure(log_level)
    capacity = default_capacity()
    if cpu is not None:
        capacity["cpu"] = cpu
    if memory_mb is not None:
        capacity["memory_mb"] = memory_mb
    capacity["gpu"] = gpu
    try:
        capacity["custom"] = {k: float(v) for k, v in _pairs(resource, "--resource").items()}
    except ValueError as exc:
        raise typer.BadParameter(f"--resource amount must be a number: {exc}") from None
    templates: dict[str, list[str]] = {}
    for item in agent_template or []:
        key, _, value = item.partition("=")
        try:
            argv = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise typer.BadParameter(f"--agent-template {key}: not JSON: {exc}") from None
        if not key or not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise typer.BadParameter('--agent-template takes NAME=["argv", ...]')
        templates[key] = argv

    async def main() -> None:
        url, ns = nats_url, root
        if url is None:
            info = discover(data_dir)
            url, ns = info["nats_url"], info.get("root", root)
        config = WorkerConfig(
            nats_url=url,
            tenant=tenant,
            root=ns,
            worker_id=worker_id,
            capacity=capacity,
            slots=slots,
            labels=_pairs(label, "--label"),
            ttl=ttl,
            shutdown_timeout=shutdown_timeout,
            data_dir=data_dir,
            serve_tenants=list(serve_tenant or []),
            agent_templates=templates,
        )
        w = Worker(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, w.request_stop)
        await w.start()
        tune_gc()  # a process of its own: the node's GC settings (docs/decisions.md)
        err.print(f"[green]worker[/green] {w.worker_id} ({tenant}) on {url}", highlight=False)
        await w.run()

    _run(main())


@app.command(hidden=True)
def projector(
    nats_url: Annotated[str, typer.Option("--nats-url", envvar="PANTHEON_NATS_URL")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    root: Root = "pantheon",
    retention: Annotated[
        float | None, typer.Option(help="Archive finished tasks this many seconds after.")
    ] = None,
    snapshot_every: Annotated[
        int, typer.Option(min=0, help="Snapshot the read models every N events (0: off).")
    ] = 0,
    linger: Annotated[
        float,
        typer.Option(
            min=0,
            max=1,
            help="Seconds a small batch waits for more events before it is written, unless"
            " a query waits for it (0: write at once).",
        ),
    ] = DEFAULT_LINGER,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """The read side (projector, queries, retention) as a process of its own; `up` starts it."""
    from projections.runner import run_read_side

    logs.configure(log_level)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_read_side(
            nats_url,
            root,
            data_dir,
            retention,
            stop,
            snapshot_every=snapshot_every or None,
            linger=linger,
        )

    _run(main())


# -- events ----------------------------------------------------------------------------------------


@app.command()
def events(
    from_seq: Annotated[int, typer.Option(min=1, help="First stream sequence to show.")] = 1,
    aggregate: Annotated[
        str | None,
        typer.Option(help="Only this aggregate: task, workflow, worker, mailbox or tenant."),
    ] = None,
    entity_id: Annotated[
        str | None, typer.Option("--id", help="Only the aggregate instance with this id.")
    ] = None,
    types: Annotated[
        list[str] | None,
        typer.Option("--type", help="Only this event type, e.g. LeaseGranted (repeatable)."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            help="Start at this time: ISO 8601 (2026-11-24T08:00:00Z) or 15m, 2h, 1d ago."
        ),
    ] = None,
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
    """Print the tenant's events from the log, oldest first.

    --aggregate and --id are filtered by the server (the consumer's filter subject);
    --type by this client (appends carry no type header); --since starts at the first
    event stored at or after the time. See docs/subscribing.md.
    """
    from pantheon_es.events import decode
    from pantheon_es.store import EventStore
    from tools.events import EventFilter, parse_time, seq_at

    try:
        wanted = EventFilter(
            tenant,
            aggregate,
            entity_id,
            frozenset(types or ()),
            parse_time(since) if since is not None else None,
        )
    except PantheonError as exc:
        raise typer.BadParameter(exc.message) from None
    needles = wanted.needles()
    collected: list[dict[str, Any]] = []

    def show(seq: int, payload: bytes) -> None:
        if not wanted.keep(payload, needles):
            return
        ev = decode(payload, seq)
        if wanted.types and ev.type not in wanted.types:
            return
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
        subject = wanted.subject(client.subjects)
        last = await store.subject_last_seq(subject)
        start = from_seq
        if wanted.since is not None:
            at = await seq_at(store, subject, wanted.since)
            start = max(start, at if at is not None else last + 1)
        if not follow and last < start:
            return
        async with store.feed(from_seq=start, subject=subject) as feed:
            while True:
                batch = await feed.next_batch(1000)
                for raw in batch:
                    if not follow and raw.seq > last:
                        return
                    show(raw.seq, raw.data)
                    if not follow and raw.seq >= last:
                        return

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends --follow
        _run(_with_log(nats_url, data_dir, tenant, root, main))
    if json_out and not follow:
        _print_json(collected)


# -- demo -----------------------------------------------------------------------------------------


# -- workflows ------------------------------------------------------------------------------------


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="Workflow file (.yaml, .yml or .json).")],
    var: Annotated[
        list[str] | None,
        typer.Option("--var", help="NAME=VALUE substituted for {NAME} in the file (repeatable)."),
    ] = None,
    detach: Annotated[
        bool, typer.Option("--detach", help="Print the workflow id and return at once.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Give up waiting after this many seconds.")] = 3600,
    workers: Annotated[
        int, typer.Option(min=1, help="Worker processes of an embedded node (no running node).")
    ] = 2,
    log_level: Annotated[
        str, typer.Option(help="Log level of an embedded node: debug, info, warning, error.")
    ] = "warning",
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Run a workflow (a DAG of tasks) from a YAML or JSON file, with live progress.

    Prints the workflow id on stdout, shows progress on stderr until it ends, then the
    results of its final tasks. Uses the `pantheon up` running on --data-dir (or
    --nats-url); if there is none, starts an embedded node (nats-server, services and
    --workers worker processes) for this run and stops it afterwards. Exit code 1 if the
    workflow failed or was cancelled.

    Example: `pantheon run examples/security-audit.yaml`
    """
    from pantheon_es import workflow_file

    logs.configure(log_level)
    variables = {
        "workflow_dir": str(file.resolve().parent),
        "cwd": str(Path.cwd()),
        "data_dir": str(data_dir.resolve()),
        **_pairs(var, "--var"),
    }
    try:
        body = workflow_file.load(file, variables)
    except PantheonError as exc:
        raise _fail(exc) from None
    embedded = False
    if nats_url is None:
        try:
            discover(data_dir)
        except UnavailableError:
            embedded = True
    if embedded and detach:
        raise typer.BadParameter("--detach needs a running `pantheon up` (or --nats-url)")

    async def go(c: PantheonClient) -> dict[str, Any]:
        created = await c.create_workflow(
            body["name"],
            body["tasks"],
            failure_policy=body["failure_policy"],
            labels=body.get("labels"),
        )
        wf_id = created["workflow_id"]
        if json_out and detach:
            _print_json({"id": wf_id})
        elif not json_out:
            print(wf_id, flush=True)
        if detach:
            return {"status": "created", "workflow_id": wf_id}
        return await _follow(c, wf_id, timeout, quiet=json_out)

    if embedded:
        final = _run(_embedded(data_dir, workers, tenant, go))
    else:
        final = _run(_with_client(nats_url, data_dir, tenant, root, go))
    if json_out:
        _print_json(final)
    elif not detach:
        from pantheon_es.workflow_file import leaf_results

        err.print(f"workflow {final['id']} [bold]{final['status']}[/bold] in "
                  f"{final.get('duration_s', 0):.2f}s", highlight=False)  # fmt: skip
        for name, result in leaf_results(final).items():
            shown = orjson.dumps(result).decode()
            err.print(f"  {name}: {shown[:500]}", highlight=False, soft_wrap=True)
    if final["status"] in ("failed", "cancelled"):
        raise typer.Exit(1)


async def _follow(c: PantheonClient, wf_id: str, timeout: float, quiet: bool) -> dict[str, Any]:
    """Wait for the workflow, drawing its progress on stderr (unless quiet)."""
    import time

    from rich.live import Live

    from pantheon_es.workflow_file import progress_view

    if quiet:
        return await c.wait_for_workflow(wf_id, timeout=timeout)
    started = time.monotonic()
    with Live(console=err, refresh_per_second=8, transient=False) as live:
        final = await c.wait_for_workflow(
            wf_id, timeout=timeout, on_change=lambda wf: live.update(progress_view(wf, started))
        )
        live.update(progress_view(final, started))
    return final


async def _embedded(
    data_dir: Path, workers: int, tenant: str, fn: Callable[[PantheonClient], Awaitable[T]]
) -> T:
    """Run ``fn`` against a node started for it (embedded nats-server, local workers)."""
    from pantheon_es.node import Node, NodeConfig

    err.print(
        f"no running `pantheon up` in {data_dir}: starting an embedded node with {workers} "
        "worker(s) for this run",
        highlight=False,
    )
    node = Node(NodeConfig(data_dir=data_dir, workers=workers))
    await node.start()
    runner = asyncio.create_task(node.run())
    try:
        assert node.nc is not None
        client = PantheonClient(node.nc, tenant=tenant, subjects=node.subjects, actor=_actor())
        for _ in range(600):  # the local workers register within a few seconds
            if int((await client.list_workers(status=["active"]))["total"]) >= workers:
                break
            await asyncio.sleep(0.05)
        return await fn(client)
    finally:
        node.request_stop()
        await runner
        err.print("embedded node stopped", highlight=False)


workflow_app = typer.Typer(help="Inspect, cancel and redrive workflows.", no_args_is_help=True)
app.add_typer(workflow_app, name="workflow")


@workflow_app.command("show")
def workflow_show(
    workflow_id: Annotated[str, typer.Argument(help="Workflow id.")],
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """A workflow's state and every task's."""
    import time

    from pantheon_es.workflow_file import progress_view

    wf = _run(_with_client(nats_url, data_dir, tenant, root, lambda c: c.get_workflow(workflow_id)))
    if json_out:
        _print_json(wf)
    else:
        out.print(progress_view(wf, time.monotonic() - wf.get("duration_s", 0), max_rows=1000))


@workflow_app.command("cancel")
def workflow_cancel(
    workflow_id: Annotated[str, typer.Argument(help="Workflow id.")],
    reason: Annotated[str | None, typer.Option(help="Why (recorded).")] = None,
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Cancel a workflow: pending tasks are cancelled, running ones stopped."""
    result = _run(
        _with_client(
            nats_url, data_dir, tenant, root, lambda c: c.cancel_workflow(workflow_id, reason)
        )
    )
    if json_out:
        _print_json(result)
    else:
        print(f"{workflow_id} {result['status']}")


@workflow_app.command("redrive")
def workflow_redrive(
    workflow_id: Annotated[str, typer.Argument(help="A failed or cancelled workflow's id.")],
    reason: Annotated[str | None, typer.Option(help="Why (recorded in the event).")] = None,
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Run a failed or cancelled workflow again: the tasks that did not complete run
    again, each once its dependencies completed; completed tasks keep their results."""
    result = _run(
        _with_client(
            nats_url, data_dir, tenant, root, lambda c: c.redrive_workflow(workflow_id, reason)
        )
    )
    if json_out:
        _print_json(result)
    else:
        again = ", ".join(result["tasks"])
        print(f"{workflow_id} {result['status']} (redrive {result['redrive']}: {again})")


@workflow_app.command("list")
def workflow_list(
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Page size.")] = 20,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many.")] = 0,
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Workflows, newest first."""
    page = _run(
        _with_client(
            nats_url,
            data_dir,
            tenant,
            root,
            lambda c: c.query("workflow", "list", {"limit": limit, "offset": offset}),
        )
    )
    if json_out:
        _print_json(page)
        return
    table = Table("ID", "NAME", "STATUS", "TASKS", "CREATED", "FINISHED")
    for w in page["items"]:
        table.add_row(w["id"], w["name"], w["status"], str(w["total"]), w["created_at"],
                      w["finished_at"] or "-")  # fmt: skip
    out.print(table)


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


# -- replay and verify -----------------------------------------------------------------------------


def _progress(what: str) -> Any:
    """A progress bar on stderr (only on a terminal: never mixed into --json or a pipe)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(f"[bold]{what}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("events"),
        TimeRemainingColumn(),
        console=err,
        disable=not err.is_terminal,
    )


SkipUnknown = Annotated[
    bool, typer.Option("--skip-unknown", help="Go past event types this build does not know.")
]


def _tenant_scope(ctx: typer.Context, tenant: str, command: str) -> str | None:
    """A :data:`TenantScope` value: None for every tenant, else the one tenant (checked).

    A tenant taken from PANTHEON_TENANT is said on stderr, so that nobody reads a
    one-tenant check as the whole system's.
    """
    from pantheon_es.errors import InvalidError
    from tools.replay import check_tenant

    if tenant == "*":
        return None
    try:
        check_tenant(tenant)
    except InvalidError as error:
        raise typer.BadParameter(error.message, param_hint="--tenant") from None
    source = ctx.get_parameter_source("tenant")
    if source is not None and source.name == "ENVIRONMENT":
        err.print(
            f"{command}: tenant {tenant} only (PANTHEON_TENANT); --tenant '*' for every tenant",
            highlight=False,
        )
    return tenant


@app.command()
def replay(
    ctx: typer.Context,
    out_file: Annotated[
        Path, typer.Option("--out", help="The new SQLite file to build the read models into.")
    ],
    until_seq: Annotated[
        int | None, typer.Option(min=0, help="Stop after this stream sequence.")
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(
            help="Stop after the last event the stream stored at or before this ISO 8601 "
            "time (e.g. 2026-11-24T09:30:00Z; no offset means UTC).",
        ),
    ] = None,
    skip_unknown: SkipUnknown = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out.")] = False,
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: TenantScope = "*",
    root: Root = "pantheon",
) -> None:
    """Rebuild every read model from the log into a new SQLite file: the state at a time.

    Reads the log up to --until-seq or --until (default: its end) and writes the
    tables `pantheon up` keeps, in a file of their own; the live log, database and
    state bucket are only read. A failed replay leaves no file. Every tenant by
    default; with --tenant T (or PANTHEON_TENANT) only T's events are read and the
    file holds T's rows (workers: those registered in T). See docs/operations.md,
    "Replay and verify".
    """
    from tools.events import parse_iso
    from tools.replay import replay as run_replay

    if until_seq is not None and until is not None:
        raise typer.BadParameter("give --until-seq or --until, not both")
    try:
        when = parse_iso(until) if until is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--until") from None
    if out_file.exists() and not force:
        raise typer.BadParameter(f"{out_file} exists; pass --force to overwrite it")
    if not out_file.parent.is_dir():
        raise typer.BadParameter(f"directory {out_file.parent} does not exist")
    scope = _tenant_scope(ctx, tenant, "replay")
    logs.configure("warning")  # on stderr: --json keeps stdout to itself
    tune_gc()

    async def main(client: PantheonClient) -> Any:
        from pantheon_es.errors import UnknownEventTypeError
        from pantheon_es.store import EventStore

        store = EventStore(client.nc, client.subjects)
        with _progress("replay") as bar:
            task = bar.add_task("replay", total=None)
            try:
                return await run_replay(
                    store, out_file, until_seq=until_seq, until=when,
                    skip_unknown=skip_unknown, force=force, tenant=scope,
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                )  # fmt: skip
            except UnknownEventTypeError as exc:
                exc.message += "; pass --skip-unknown to go past it"
                raise

    summary = _run(_with_log(nats_url, data_dir, scope or "default", root, main))
    if json_out:
        _print_json(summary.to_dict())
    else:
        of = f"tenant {scope}'s " if scope is not None else ""
        out.print(
            f"replayed {summary.events} {of}events (through sequence {summary.last_seq}) "
            f"into {summary.out} in {summary.seconds:.2f} s",
            highlight=False,
        )


@app.command()
def verify(
    ctx: typer.Context,
    db: Annotated[
        Path | None,
        typer.Option(help="Live read-model database. Default: DATA_DIR/projections.db."),
    ] = None,
    skip_unknown: SkipUnknown = False,
    show: Annotated[
        int, typer.Option(min=0, help="Differing rows and violations listed per table/check.")
    ] = 20,
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: TenantScope = "*",
    root: Root = "pantheon",
) -> None:
    """Check the live read models against a rebuild, and the invariants of the whole history.

    Rebuilds the read models up to the live database's checkpoint and compares
    them table by table (checksums; differing rows named by key), then folds the
    whole log through the invariant checks (leases, fencing, capacity, terminal
    events, message order, dependencies), naming each event that breaks one. Exit
    code 0 if all agree, 1 on any difference or violation. Every tenant by default;
    with --tenant T (or PANTHEON_TENANT) only T's events and rows, and the checks
    that need every tenant (worker capacity: workers are shared) are reported as
    not checked.
    """
    from pantheon_es.node import DB_NAME
    from tools.verify import verify as run_verify

    db_path = db if db is not None else data_dir / DB_NAME
    scope = _tenant_scope(ctx, tenant, "verify")
    logs.configure("warning")
    tune_gc()

    async def main(client: PantheonClient) -> Any:
        from pantheon_es.store import EventStore

        store = EventStore(client.nc, client.subjects)
        with _progress("verify") as bar:
            task = bar.add_task("verify", total=None)
            return await run_verify(
                store, db_path, skip_unknown=skip_unknown, tenant=scope,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )  # fmt: skip

    report = _run(_with_log(nats_url, data_dir, scope or "default", root, main))
    if json_out:
        _print_json(report.to_dict())
    else:
        _show_verify(report, show)
    if not report.ok:
        bad = sum(1 for t in report.tables if not t.equal)
        only = f" (tenant {report.tenant} only)" if report.tenant is not None else ""
        err.print(
            f"[red]verify FAILED[/red]{only}: {bad} table(s) differ from a rebuild, "
            f"{len(report.violations)} invariant violation(s)",
            highlight=False,
        )
        raise typer.Exit(1)


def _show_verify(report: Any, show: int) -> None:
    tables = Table("TABLE", "LIVE ROWS", "REBUILT ROWS", "CHECKSUM", "RESULT")
    for t in report.tables:
        result = "[green]equal[/green]" if t.equal else "[red]DIFFERS[/red]"
        tables.add_row(t.table, str(t.live_rows), str(t.rebuilt_rows), t.live_checksum[:16],
                       result)  # fmt: skip
    whose = f"tenant {report.tenant}'s rows of the " if report.tenant is not None else ""
    out.print(
        f"{whose}read models of {report.db} at sequence {report.checkpoint} against a rebuild:",
        highlight=False,
    )
    out.print(tables)
    for t in report.tables:
        named = [("missing (rebuild only)", k) for k in t.missing]
        named += [("extra (live only)", k) for k in t.extra]
        named += [(f"changed {sorted(c['columns'])}", c["key"]) for c in t.changed]
        for what, key in named[:show]:
            out.print(f"  {t.table} {dict(zip(t.key, key, strict=True))}: {what}",
                      highlight=False)  # fmt: skip
        if len(named) > show:
            out.print(f"  {t.table}: ... and {len(named) - show} more rows", highlight=False)
    from tools.invariants import INVARIANTS

    checks = Table("INVARIANT", "VIOLATIONS", "WHAT IT MEANS")
    for name, text in INVARIANTS.items():
        count = report.counts.get(name)
        if count is None:
            checks.add_row(name, "[yellow]not checked[/yellow]", text)
        else:
            checks.add_row(name, str(count) if count else "[green]0[/green]", text)
    of = f"tenant {report.tenant}'s " if report.tenant is not None else ""
    out.print(
        f"invariants over {report.events} {of}events (through sequence {report.last_seq}):",
        highlight=False,
    )
    out.print(checks)
    for name, why in report.not_checked.items():
        out.print(f"  {name} not checked: {why}", highlight=False, soft_wrap=True)
    shown: dict[str, int] = {}
    for v in report.violations:
        shown[v.invariant] = shown.get(v.invariant, 0) + 1
        if shown[v.invariant] <= show:
            out.print(f"  {v}", highlight=False, soft_wrap=True)
    for name, count in shown.items():
        if count > show:
            out.print(f"  {name}: ... and {count - show} more", highlight=False)
    if report.ok:
        scope = f" (tenant {report.tenant} only)" if report.tenant is not None else ""
        out.print(f"[green]verify OK[/green]{scope} in {report.seconds:.2f} s")


# -- schema ----------------------------------------------------------------------------------------


# -- watch ----------------------------------------------------------------------------------------


@app.command()
def watch(
    model: Annotated[
        str | None,
        typer.Argument(help="task, agent, workflow, worker or mailbox (default: all of them)."),
    ] = None,
    filters: Annotated[
        list[str] | None,
        typer.Option(
            "--filter", help="FIELD=VALUE[,VALUE...]: only entities whose field is one of these."
        ),
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="Print the current values and exit.")
    ] = False,
    json_out: Annotated[
        bool,
        typer.Option(
            "--json",
            help="One JSON object per line per change: {key, model, id, op, revision, value}.",
        ),
    ] = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Show the current state of the tenant's entities live, from the KV bucket pantheon-state.

    First the current values, then every change, in order per entity (Ctrl-C stops).
    With a filter, an entity that stops matching is reported once with op `leave`;
    an archived entity with op `delete`. Example: `pantheon watch task --filter status=running`.
    """
    from pantheon_es.watch import MODELS
    from tools.watch import follow

    if model is not None and model not in MODELS:
        raise typer.BadParameter(f"MODEL must be one of {', '.join(MODELS)}")
    pairs = _pairs(filters, "--filter")

    async def main(client: PantheonClient) -> int:
        return await follow(client, model, pairs, once=once, json_lines=json_out, console=out)

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends it
        _run(_with_log(nats_url, data_dir, tenant, root, main, queries=True))


# -- audit ----------------------------------------------------------------------------------------


@app.command()
def audit(
    entity_id: Annotated[
        str, typer.Argument(metavar="ID", help="A task, agent, workflow or worker id.")
    ],
    fmt: Annotated[
        str,
        typer.Option("--format", help="table (default), json, jsonl or csv."),
    ] = "table",
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Everything the log says about one task, agent, workflow or worker.

    A timeline of every event concerning it (stream sequence, time, type, actor,
    causation and correlation), each task's attempts (lease, worker, time pending,
    leased and running, outcome, result or error), the time spent in each state and
    the messages sent and received. A workflow's audit covers all of its tasks; a
    worker's, the leases it held. Read-only. `--json` is `--format json`.
    """
    from tools.audit import FORMATS, Auditor, render, tables

    if json_out:
        fmt = "json"
    if fmt not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}")

    async def main(client: PantheonClient) -> Any:
        with err.status(f"reading the log for {entity_id}") as status:
            auditor = Auditor(client, progress=lambda msg: status.update(msg))
            return await auditor.audit(entity_id)

    report = _run(_with_log(nats_url, data_dir, tenant, root, main, queries=True))
    if fmt == "table":
        for table in tables(report):
            out.print(table)
    else:
        sys.stdout.write(render(report, fmt))


@app.command()
def whatif(
    ctx: typer.Context,
    policy: Annotated[
        Path,
        typer.Option(
            "--policy",
            help="Policy to simulate: a YAML or JSON file (see docs/whatif.md).",
        ),
    ],
    until: Annotated[
        str | None,
        typer.Option(help="Use the log up to this time (ISO 8601, e.g. 2026-11-24T09:00:00Z)."),
    ] = None,
    until_seq: Annotated[
        int | None, typer.Option(min=1, help="Use the log up to this stream sequence.")
    ] = None,
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: TenantScope = "*",
    root: Root = "pantheon",
) -> None:
    """Replay the recorded workload under another scheduling policy, in simulated time.

    Reads the log (read-only: nothing is appended): task arrivals, worker capacity over time
    and observed run durations. Runs them through the scheduler's placement policy as set by
    --policy (weights, aging, limits, or plain FIFO) and prints, side by side with what really
    happened, wait-time percentiles per priority band and per tenant, utilisation per resource
    and makespan. Always simulates every tenant's work (workers and limits are shared);
    --tenant T (or PANTHEON_TENANT) reports T's figures only, so it still reads the whole log.

    Example: `pantheon whatif --policy examples/whatif-fifo.yaml`. Policy fields: mode
    (priority|fifo), aging_per_s, band, tenant_weights, fairness_weights, max_running_agents,
    concurrency_limits, max_running_per_tenant, tenant_max_running (docs/whatif.md).
    """

    from rich.progress import Progress

    from pantheon_es.store import EventStore
    from tools.events import parse_iso
    from tools.whatif import PolicyFileError, compare, load_policy, read_workload, tables

    if until is not None and until_seq is not None:
        raise typer.BadParameter("give --until or --until-seq, not both")
    try:
        policy_file = load_policy(policy)
    except PolicyFileError as exc:
        raise typer.BadParameter(str(exc), param_hint="--policy") from None
    cutoff = None
    if until is not None:
        try:
            cutoff = parse_iso(until)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--until") from None
    scope = _tenant_scope(ctx, tenant, "whatif")

    async def main(client: PantheonClient) -> dict[str, Any]:
        store = EventStore(client.nc, client.subjects)
        with Progress(console=err, transient=True, disable=json_out) as bar:
            task = bar.add_task("reading the log", total=None)
            workload = await read_workload(
                store,
                until_seq=until_seq,
                until=cutoff,
                progress=lambda seq, last: bar.update(task, completed=seq, total=last),
            )
            bar.update(task, description=f"simulating {len(workload.tasks)} tasks")
            return compare(workload, policy_file, scope)

    report = _run(_with_log(nats_url, data_dir, scope or "default", root, main))
    if json_out:
        _print_json(report)
        return
    if scope is not None:
        out.print(
            f"tenant {scope}'s figures; the simulation ran every tenant's work "
            f"({report['log']['events']} events), as all compete for the same workers",
            highlight=False,
        )
    for table in tables(report):
        out.print(table)


@app.command()
def snapshot(
    ctx: typer.Context,
    keep: Annotated[
        int, typer.Option(min=1, help="Snapshots to keep in the bucket; older ones are deleted.")
    ] = 3,
    from_log: Annotated[
        bool,
        typer.Option(
            "--from-log", help="Rebuild the read models from the log first (no local node needed)."
        ),
    ] = False,
    list_only: Annotated[
        bool, typer.Option("--list", help="Only list the stored snapshots.")
    ] = False,
    json_out: Json = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Annotated[
        str,
        typer.Option(
            "--tenant",
            envvar="PANTHEON_TENANT",
            metavar="'*'",
            help="Only '*': a snapshot holds every tenant. Another tenant named here is "
            "refused (exit 2); one in PANTHEON_TENANT is ignored, with a note.",
        ),
    ] = "*",
    root: Root = "pantheon",
) -> None:
    """Store a snapshot of the read models in JetStream (object store <namespace>-snapshots).

    Copies the read models of the node on --data-dir at their checkpoint, while it runs.
    A node starting with no read models (or far behind) restores the newest snapshot
    and replays only the rest of the log. Never appends to the event log.
    A snapshot always covers every tenant: a node restores it whole, so --tenant T is
    refused with exit code 2 rather than ignored (PANTHEON_TENANT, often set for everyday
    use, is ignored with a note on stderr).
    """
    from tools.snapshot import snapshot as make

    if tenant != "*":
        if getattr(ctx.get_parameter_source("tenant"), "name", "") == "ENVIRONMENT":
            err.print(f"note: PANTHEON_TENANT={tenant} ignored: a snapshot holds every tenant")
        else:
            raise typer.BadParameter(
                f"a snapshot holds every tenant's read models (a node restores it whole), so "
                f"it cannot be narrowed to tenant {tenant!r}; pass --tenant '*'",
                param_hint="--tenant",
            )
    logs.configure("warning")
    with err.status("snapshot", spinner="dots") as status:
        result = _run(
            make(
                nats_url,
                data_dir,
                root,
                keep=keep,
                from_log=from_log,
                list_only=list_only,
                step=lambda what: status.update(what),
            )
        )
    if json_out:
        _print_json(result)
        return
    made = result.get("snapshot")
    if made is not None:
        out.print(
            f"snapshot {made['object']}: sequence {made['last_seq']:,}, "
            f"{made['size'] / 2**20:,.1f} MiB; pruned {len(result['pruned'])}",
            highlight=False,
        )
    table = Table("object", "last seq", "size MiB", "schema", "created")
    for s in result["snapshots"]:
        table.add_row(
            s["object"], f"{s['last_seq']:,}", f"{s['size'] / 2**20:,.1f}", s["digest"],
            s["created_at"],
        )  # fmt: skip
    out.print(table)


@app.command()
def schema(
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write to this file instead of stdout.")
    ] = None,
    asyncapi: Annotated[
        bool,
        typer.Option(
            "--asyncapi",
            help="Print an AsyncAPI 3.0 document instead: every command and query subject "
            "with its request and reply, every event subject, the state bucket and the work "
            "offers (docs/other-languages.md).",
        ),
    ] = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    tenant: Tenant = "default",
    root: Root = "pantheon",
) -> None:
    """Print the JSON Schema of every command, query, event and reply.

    Works offline. With --asyncapi, --nats-url (or the `pantheon up` on --data-dir, if one
    runs) fills the document's servers and --tenant the default of its tenant parameter.
    """
    from pantheon_es.asyncapi import export_asyncapi
    from pantheon_es.schema import export
    from pantheon_es.subjects import Subjects

    try:
        subjects = Subjects(root)
        if asyncapi:
            if nats_url is None:
                with contextlib.suppress(UnavailableError):  # offline is fine: a placeholder
                    info = discover(data_dir)
                    nats_url, subjects = info["nats_url"], Subjects(info.get("root", root))
            body = export_asyncapi(subjects, nats_url=nats_url, tenant=tenant)
        else:
            body = export(subjects)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    doc = orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n"
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
