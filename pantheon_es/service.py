"""The command service: NATS request/reply in, events appended, a reply out.

For each request on ``<root>.cmd.<tenant>.<aggregate>.<verb>`` (queue group
``pantheon-cmd``, so replicas share the load):

    size check -> JSON -> command model -> load aggregate -> decide (pure)
    -> append (expected last subject sequence) -> reply {"ok": ...}

Bad input gets a typed error reply and appends nothing; no request can stop
the service. Aggregate states are cached with their last sequence; a stale
cache (another replica wrote) shows up as a concurrency conflict on append,
and the command is decided again on freshly loaded state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import ValidationError

from pantheon_es import aggregates, ids
from pantheon_es.commands import COMMANDS, BulkCommand, Command
from pantheon_es.domain import AggregateType, DecideContext
from pantheon_es.endpoint import invalid, parse_body, respond, route
from pantheon_es.errors import ConcurrencyError, ConflictError, ForbiddenError, PantheonError
from pantheon_es.events import Event, make_event
from pantheon_es.idempotency import Claim, ClaimTaken, IdempotencyIndex, fingerprint
from pantheon_es.store import AppendResult, EventStore

log = structlog.get_logger(__name__)

QUEUE_GROUP = "pantheon-cmd"


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    max_command_bytes: int = 1024 * 1024
    idempotency_ttl: float = 7 * 24 * 3600.0
    #: A pending idempotency claim younger than this is "in flight", older is stale.
    claim_timeout: float = 30.0
    cache_size: int = 100_000
    max_inflight: int = 2048
    decide_attempts: int = 5


class AggregateCache:
    """Folded aggregate states with their last stream sequence, LRU-bounded."""

    def __init__(self, store: EventStore, size: int) -> None:
        self._store = store
        self._size = size
        self._entries: OrderedDict[tuple[str, str, str], tuple[Any, int]] = OrderedDict()

    async def load(
        self, kind: AggregateType[Any], tenant: str, aggregate_id: str
    ) -> tuple[Any, int]:
        key = (tenant, kind.name, aggregate_id)
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit
        history = await self._store.read_aggregate(tenant, kind.name, aggregate_id)
        state = kind.fold([h.event for h in history])
        seq = history[-1].seq if history else 0
        if history:
            self.put(key, state, seq)
        return state, seq

    def put(self, key: tuple[str, str, str], state: Any, seq: int) -> None:
        known = self._entries.get(key)
        if known is not None and known[1] > seq:
            return  # a later state is here already (create_all holds no per-key lock)
        self._entries[key] = (state, seq)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def evict(self, key: tuple[str, str, str]) -> None:
        self._entries.pop(key, None)


class _KeyedLocks:
    """One asyncio lock per aggregate, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str, str], list[Any]] = {}

    def hold(self, key: tuple[str, str, str]) -> _Held:
        return _Held(self._locks, key)


class _Held:
    """``async with`` one aggregate's lock (a class: ``asynccontextmanager`` cost 5 µs
    of generator machinery per command)."""

    __slots__ = ("_entry", "_key", "_locks")

    def __init__(self, locks: dict[tuple[str, str, str], list[Any]], key: tuple[str, str, str]):
        self._locks = locks
        self._key = key
        entry = locks.get(key)
        if entry is None:
            entry = locks[key] = [asyncio.Lock(), 0]
        self._entry = entry

    async def __aenter__(self) -> None:
        entry = self._entry
        entry[1] += 1
        try:
            await entry[0].acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._entry[0].release()
        self._leave()

    def _leave(self) -> None:
        entry = self._entry
        entry[1] -= 1
        if entry[1] == 0:
            del self._locks[self._key]


class Placer(Protocol):
    """Decides a new task's lease while it is being submitted (the node's scheduler):
    ``Scheduler.idle``, ``Scheduler.place_new`` and ``Scheduler.placed_new``."""

    def idle(self) -> bool: ...

    def place_new(self, tenant: str, state: Any, submitted: Event[Any]) -> Command | None: ...

    def placed_new(
        self, key: tuple[str, str], submitted_seq: int | None, result: dict[str, Any] | None
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class _Plan:
    key: tuple[str, str, str]
    state: Any
    expected_seq: int
    events: list[Event[Any]]
    result: dict[str, Any]


class CommandService:
    """Serves commands for every tenant of one namespace."""

    def __init__(
        self,
        nc: NATS,
        store: EventStore,
        config: ServiceConfig | None = None,
        *,
        queue: str = QUEUE_GROUP,
    ) -> None:
        self.nc = nc
        self.store = store
        self.subjects = store.subjects
        self.config = config or ServiceConfig()
        self.queue = queue
        self.cache = AggregateCache(store, self.config.cache_size)
        self.idempotency = IdempotencyIndex(
            nc.jetstream(), self.subjects, self.config.idempotency_ttl, store.config.replicas
        )
        self._locks = _KeyedLocks()
        #: keys whose "new aggregate" assumption failed (a client-chosen id that exists)
        self._conflicted: set[tuple[str, str, str]] = set()
        self._slots = asyncio.Semaphore(self.config.max_inflight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Any = None
        self._stopped = asyncio.Event()
        #: Called with (tenant, command) before a new aggregate is decided; raises to refuse
        #: (the scheduler's backpressure).
        self.admission: Callable[[str, Command], None] | None = None
        #: The node's scheduler leadership, if any: decisions carry its epoch.
        self.leadership: Any = None
        #: The node's scheduler, if in this process: a new task's lease can then be
        #: appended right behind its submission (:meth:`_append_placed`).
        self.placer: Placer | None = None
        assert aggregates.AGGREGATE_TYPES  # registries loaded

    # -- life cycle --------------------------------------------------------------------------
    async def __aenter__(self) -> CommandService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def start(self) -> None:
        await self.idempotency.provision()
        self._sub = await self.nc.subscribe(
            self.subjects.all_commands,
            queue=self.queue,
            cb=self._on_msg,
            pending_msgs_limit=100_000,
        )
        log.info("command service started", subject=self.subjects.all_commands, queue=self.queue)

    async def run(self) -> None:
        """Serve until :meth:`shutdown`."""
        await self._stopped.wait()

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking requests, let the ones in flight finish. Idempotent."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        self._stopped.set()

    # -- request handling ------------------------------------------------------------------------
    async def _on_msg(self, msg: Msg) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._serve(msg))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _serve(self, msg: Msg) -> None:
        await respond(msg, self.execute_raw(msg.subject, msg.data))

    async def execute_raw(self, subject: str, data: bytes) -> dict[str, Any]:
        """Parse and execute one request; raises a typed error for bad input."""
        parsed = self.subjects.parse_command(subject)
        body = parse_body(data, self.config.max_command_bytes)
        cls = route(parsed, COMMANDS, "command", subject)
        assert parsed is not None
        try:
            command = cls.model_validate(body)
        except ValidationError as exc:
            raise invalid(cls.__name__, exc) from None
        return await self.execute(parsed.tenant, command)

    async def execute(
        self,
        tenant: str,
        command: Command,
        *,
        known: tuple[Any, int] | None = None,
        epoch: int | None = None,
    ) -> dict[str, Any]:
        """Decide and append one validated command; returns the reply's result.

        ``known`` is (state, last seq) of the target aggregate when the caller
        already holds it (the scheduler does); a stale one costs one retry.
        ``epoch``: a scheduler decision's leadership epoch; refused (``forbidden``)
        unless it is the current leader's (see :mod:`pantheon_es.leader`).
        """
        if isinstance(command, BulkCommand):
            return await command.run(self, tenant)
        command_id = ids.new_id()
        correlation_id = command.correlation_id or command_id
        # Every request runs in a task of its own, so the binding needs no reset.
        structlog.contextvars.bind_contextvars(
            tenant=tenant, correlation_id=correlation_id, command=type(command).__name__
        )
        if command.idempotency_key is not None:
            return await self._execute_keyed(tenant, command, command_id, correlation_id)
        return await self._execute_once(tenant, command, command_id, correlation_id, known, epoch)

    async def create_all(self, tenant: str, commands: Sequence[Command]) -> list[dict[str, Any]]:
        """Decide commands that each create a new aggregate of a chosen id, and append
        them together (``EventStore.append_new``: atomic batches of up to 1,000 events).

        For many creations at once (a workflow's tasks): 1,000 in one batch were
        stored in 48 ms here, against 143 ms as single appends all in flight
        (docs/decisions.md). No idempotency keys. Raises ``ConcurrencyError`` when
        one of them exists already (nothing of its batch is stored): the caller
        falls back to :meth:`execute` one by one.
        """
        if any(command.target_id() is None for command in commands):
            raise ValueError("create_all creates aggregates of chosen ids")
        return await self._append_new([await self._plan_new(tenant, c) for c in commands])

    async def create_each(
        self, tenant: str, commands: Sequence[Command]
    ) -> list[dict[str, Any] | PantheonError]:
        """Like :meth:`create_all`, for commands whose new aggregates get ids made here
        (so none can exist already), each decided on its own: one refused (invalid,
        ``overloaded``) gets its typed error in its place, the others are appended
        together. Raises ``UnavailableError`` when a batch was not acknowledged."""
        outcomes: list[dict[str, Any] | PantheonError] = []
        plans: list[_Plan] = []
        where: list[int] = []
        for i, command in enumerate(commands):
            if command.target_id() is not None:
                raise ValueError("create_each makes the ids of what it creates")
            try:
                plans.append(await self._plan_new(tenant, command))
            except PantheonError as err:
                outcomes.append(err)
                continue
            outcomes.append({})
            where.append(i)
        for i, result in zip(where, await self._append_new(plans), strict=True):
            outcomes[i] = result
        return outcomes

    async def _plan_new(self, tenant: str, command: Command) -> _Plan:
        if not command.creates or command.idempotency_key:
            raise ValueError(f"{type(command).__name__} cannot be created in bulk")
        command_id = ids.new_id()
        correlation_id = command.correlation_id or command_id
        key = self._key(tenant, command)
        return await self._plan(key, command, command_id, correlation_id, (None, 0))

    async def _append_new(self, plans: list[_Plan]) -> list[dict[str, Any]]:
        seqs = iter(await self.store.append_new([p.events for p in plans if p.events]))
        results = []
        for plan in plans:
            if not plan.events:
                results.append({**plan.result, "seq": 0})
                continue
            seq = next(seqs)
            self._cache(plan, seq)
            results.append({**plan.result, "seq": seq})
        return results

    async def _plan(
        self,
        key: tuple[str, str, str],
        command: Command,
        command_id: str,
        correlation_id: str,
        known: tuple[Any, int] | None = None,
        epoch: int | None = None,
    ) -> _Plan:
        tenant, aggregate, aggregate_id = key
        leadership = self.leadership
        if epoch is not None and leadership is not None and not leadership.is_current(epoch):
            raise ForbiddenError(
                f"scheduler epoch {epoch} is not the current leader's "
                f"({leadership.current_epoch}): decision refused",
                details={"epoch": epoch, "current_epoch": leadership.current_epoch},
            )
        kind = aggregates.AGGREGATE_TYPES[aggregate]
        if known is not None:
            state, seq = known
        elif command.creates and key not in self._conflicted:
            state, seq = None, 0  # a new aggregate: nothing to load (append checks seq 0)
        else:
            state, seq = await self.cache.load(kind, tenant, aggregate_id)
        related = {}
        for other, other_id in command.related():
            other_kind = aggregates.AGGREGATE_TYPES[other]
            related[(other, other_id)] = (await self.cache.load(other_kind, tenant, other_id))[0]
        if state is None and command.creates and self.admission is not None:
            self.admission(tenant, command)  # backpressure: may refuse with ``overloaded``
        now = datetime.now(UTC)
        decision = kind.decide(state, command, DecideContext(tenant, aggregate_id, now, related))
        events = [
            make_event(
                data,
                event_id=ids.new_id(),
                tenant=tenant,
                aggregate_id=aggregate_id,
                occurred_at=now,
                actor=command.actor or "anonymous",
                correlation_id=correlation_id,
                causation_id=command_id,
            )
            for data in decision.events
        ]
        return _Plan(key, state, seq, events, dict(decision.result))

    async def _append(self, plan: _Plan) -> int:
        """Append a plan's events; returns the last sequence. Updates the cache."""
        placer = self.placer
        if (
            placer is not None
            and plan.state is None
            and plan.key[1] == "task"
            and len(plan.events) == 1
            and plan.expected_seq == 0
            and placer.idle()  # else place_new declines: no task and loop turn for it
        ):
            return await self._append_placed(plan, placer)
        return await self._append_plain(plan)

    async def _append_plain(self, plan: _Plan) -> int:
        result = await self.store.append(plan.events, expected_seq=plan.expected_seq)
        self._cache(plan, result.last_seq)
        structlog.contextvars.bind_contextvars(stream_seq=result.last_seq)
        log.debug("events appended", count=len(plan.events), stream_seq=result.last_seq)
        return result.last_seq

    async def _append_placed(self, plan: _Plan, placer: Placer) -> int:
        """Submit a new task and, if the scheduler places it at once, append its lease
        right behind the submission (``EventStore.append_after``): two hops fewer than
        a lease decided once the submission comes back through the feed.

        The submission is sent first and the lease decided while it is stored; the
        reply does not wait for the lease's ack, whose outcome goes to
        ``placer.placed_new``. docs/decisions.md, "A new task's lease in its
        submission's wake"."""
        key = plan.key
        lease_key = (key[0], key[2])
        submitted = plan.events[0]
        first = asyncio.ensure_future(self.store.append(plan.events, expected_seq=0))
        await asyncio.sleep(0)  # the append publishes the submission ...
        self.store.flush()  # ... and it leaves now, while the lease is decided
        kind = aggregates.AGGREGATE_TYPES["task"]
        state = kind.fold(plan.events, None)
        command = placer.place_new(key[0], state, submitted)
        grant: _Plan | None = None
        if command is not None:
            try:
                command_id = ids.new_id()
                grant = await self._plan(
                    key, command, command_id, command.correlation_id or command_id, (state, 0),
                    getattr(command, "epoch", None),
                )  # fmt: skip
            except PantheonError as err:
                log.info("lease at submission refused", error=err.message)
        second = None
        if grant is not None and len(grant.events) == 1:
            second = asyncio.ensure_future(
                self.store.append_after(grant.events[0], submitted.event_id)
            )
            await asyncio.sleep(0)  # it publishes the lease ...
            self.store.flush()  # ... which leaves now
        try:
            result = await first
        except BaseException:
            if second is not None:
                second.add_done_callback(_retrieve)
            if command is not None:
                placer.placed_new(lease_key, None, None)
            raise
        seq = result.last_seq
        self.cache.put(key, state, seq)
        structlog.contextvars.bind_contextvars(stream_seq=seq)
        if command is None:
            return seq
        if second is None or grant is None:
            placer.placed_new(lease_key, seq, None)
            return seq

        def leased(done: asyncio.Future[AppendResult]) -> None:
            err = done.exception() if not done.cancelled() else asyncio.CancelledError()
            if err is None:
                grant_seq = done.result().last_seq
                self.cache.put(key, kind.fold(grant.events, state), grant_seq)
                placer.placed_new(lease_key, seq, {**grant.result, "seq": grant_seq})
                return
            if not isinstance(err, PantheonError):
                log.error("lease at submission failed", error=repr(err))
            placer.placed_new(lease_key, seq, None)

        second.add_done_callback(leased)
        return seq

    def _cache(self, plan: _Plan, last_seq: int) -> None:
        """Remember the aggregate's state after a plan's events, stored up to ``last_seq``."""
        kind = aggregates.AGGREGATE_TYPES[plan.key[1]]
        self.cache.put(plan.key, kind.fold(plan.events, plan.state), last_seq)

    def _key(self, tenant: str, command: Command) -> tuple[str, str, str]:
        target = command.target_id()
        return (tenant, command.aggregate, target if target is not None else ids.new_id())

    def _conflict(self, key: tuple[str, str, str]) -> None:
        """Forget what we believed about ``key``; the next plan loads it from the log."""
        self.cache.evict(key)
        self._conflicted.add(key)
        if len(self._conflicted) > 10_000:
            self._conflicted.clear()

    async def _execute_once(
        self,
        tenant: str,
        command: Command,
        command_id: str,
        correlation_id: str,
        known: tuple[Any, int] | None = None,
        epoch: int | None = None,
    ) -> dict[str, Any]:
        key = self._key(tenant, command)
        async with self._locks.hold(key):
            for _attempt in range(self.config.decide_attempts):
                plan = await self._plan(key, command, command_id, correlation_id, known, epoch)
                if not plan.events:
                    return {**plan.result, "seq": plan.expected_seq}
                try:
                    seq = await self._append(plan)
                except ConcurrencyError:  # another writer: reload, decide again
                    self._conflict(key)
                    known = None
                    continue
                return {**plan.result, "seq": seq}
        raise ConflictError(
            "the aggregate kept changing while deciding; try again", retry_after=0.1
        )

    async def _execute_keyed(
        self, tenant: str, command: Command, command_id: str, correlation_id: str
    ) -> dict[str, Any]:
        assert command.idempotency_key is not None
        index = self.idempotency
        ikey = index.key(tenant, command.idempotency_key)
        fp = fingerprint(command)
        key = self._key(tenant, command)
        async with self._locks.hold(key):
            for _attempt in range(self.config.decide_attempts):
                takeover: int | None = None
                found = await index.get(ikey)
                if found is not None:
                    claim, revision = found
                    reply = await self._resolve_claim(ikey, claim, revision, fp, command)
                    if reply is not None:
                        return reply
                    takeover = revision  # a stale claim whose events never landed
                plan = await self._plan(key, command, command_id, correlation_id)
                claim = Claim(
                    fingerprint=fp,
                    state="pending",
                    at=index.now(),
                    reply=plan.result,
                    subject=self.subjects.aggregate(*key),
                    expected_seq=plan.expected_seq,
                    event_ids=[e.event_id for e in plan.events],
                )
                if not plan.events:  # a no-op decision: remember the answer as it is
                    claim = _done(claim, {**plan.result, "seq": plan.expected_seq})
                try:
                    if takeover is None:
                        revision = await index.create(ikey, claim)
                    else:
                        revision = await index.update(ikey, claim, takeover)
                except ClaimTaken:
                    continue  # a concurrent request claimed first: look again
                if not plan.events:
                    return claim.reply
                try:
                    seq = await self._append(plan)
                except ConcurrencyError:
                    self._conflict(key)
                    await index.release(ikey, revision)
                    continue
                # Any other failure leaves the claim pending: the append may have
                # landed, and the next request with this key resolves it from the log.
                reply = {**plan.result, "seq": seq}
                with contextlib.suppress(ClaimTaken):
                    await index.update(ikey, _done(claim, reply), revision)
                return reply
        raise ConflictError(
            "the aggregate kept changing while deciding; try again", retry_after=0.1
        )

    async def _resolve_claim(
        self, ikey: str, claim: Claim, revision: int, fp: str, command: Command
    ) -> dict[str, Any] | None:
        """The reply an existing claim stands for; ``None`` if it is stale and may be taken over."""
        if claim.fingerprint != fp:
            raise ConflictError(
                "this idempotency key was already used for a different command",
                details={"idempotency_key": command.idempotency_key},
            )
        if claim.state == "done":
            return claim.reply
        landed = await self.store.landed_seq(claim.subject, claim.expected_seq, claim.event_ids)
        if landed is not None:  # the earlier request appended, then stopped
            reply = {**claim.reply, "seq": landed + len(claim.event_ids) - 1}
            with contextlib.suppress(ClaimTaken):
                await self.idempotency.update(ikey, _done(claim, reply), revision)
            return reply
        age = self.idempotency.now() - claim.at
        if age < self.config.claim_timeout:
            raise ConflictError(
                "a request with this idempotency key is in flight",
                details={"idempotency_key": command.idempotency_key},
                retry_after=round(min(1.0, self.config.claim_timeout - age), 3),
            )
        return None


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Read a future's outcome that nobody awaits (no "exception never retrieved")."""
    if not future.cancelled():
        future.exception()


def _done(claim: Claim, reply: dict[str, Any]) -> Claim:
    return Claim(
        claim.fingerprint,
        "done",
        claim.at,
        reply,
        claim.subject,
        claim.expected_seq,
        claim.event_ids,
    )
