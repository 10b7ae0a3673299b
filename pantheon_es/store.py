"""The event store: one JetStream stream, one subject per aggregate instance.

* :meth:`EventStore.provision` creates or updates the stream idempotently.
* :meth:`EventStore.append` writes the events of one decision with
  ``Nats-Msg-Id`` = event id and ``Nats-Expected-Last-Subject-Sequence`` =
  the aggregate's last sequence; several events go in one atomic batch.
* A wrong-last-sequence answer (10071, or 10164 inside a batch) is told apart
  from "my earlier attempt landed but its ack was lost" by reading what the
  subject holds right after the expected sequence and comparing msg ids.
* :meth:`EventStore.read_aggregate` reads one aggregate's history in one
  batched direct get; :class:`EventFeed` tails or replays the stream with an
  ordered push consumer.
* Reads that name a filter subject (the feed, :meth:`EventStore.first_seq`,
  :meth:`EventStore.stream_last_seq`, :meth:`EventStore.subject_last_seq`) go only
  through JetStream API subjects that carry that filter, so NATS permissions can
  hold a user to one tenant's events (docs/decisions.md, "NATS permissions for
  one tenant").

JetStream error codes are mapped here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, NoReturn

import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RePublish,
    StorageType,
    StreamConfig,
)

from pantheon_es import aggregates, ids
from pantheon_es.connection import Connection
from pantheon_es.errors import (
    ConcurrencyError,
    ForbiddenError,
    InternalError,
    PantheonError,
    UnavailableError,
)
from pantheon_es.events import Event, decode, encode
from pantheon_es.subjects import Subjects

log = structlog.get_logger(__name__)

assert aggregates.REGISTRY  # every event type registered before anything is decoded

# JetStream API error codes (nats-server/server/errors.json).
JS_WRONG_LAST_SEQUENCE = 10071
JS_BATCH_WRONG_LAST_SEQUENCE = 10164
JS_BATCH_DUPLICATE_MSG_ID = 10201
JS_WRONG_LAST_MSG_ID = 10070
_WRONG_LAST_SEQUENCE = {JS_WRONG_LAST_SEQUENCE, JS_BATCH_WRONG_LAST_SEQUENCE}

#: The server refuses atomic batches larger than this.
MAX_BATCH = 1000
#: What an append that got no acknowledgement raises (it may have been stored).
_NO_ACK = (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError)

H_MSG_ID = "Nats-Msg-Id"
H_EXPECTED_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
H_EXPECTED_LAST_MSG_ID = "Nats-Expected-Last-Msg-Id"
H_BATCH_ID = "Nats-Batch-Id"
H_BATCH_SEQ = "Nats-Batch-Sequence"
H_BATCH_COMMIT = "Nats-Batch-Commit"

#: The JetStream API's subject prefix (no JetStream domain).
JS_API = "$JS.API"


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Stream settings the store owns."""

    replicas: int = 1
    duplicate_window: float = 120.0  # seconds; the design asks for >= 2 min
    ack_timeout: float = 5.0
    append_attempts: int = 3  # publishes of one append before giving up (lost acks)
    max_inflight_batches: int = 32  # the server allows 50 per stream


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an append's events landed."""

    first_seq: int
    last_seq: int
    #: True if an earlier attempt of the same append had already written it.
    already_written: bool = False


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event read back from the stream with its position."""

    seq: int
    subject: str
    event: Event[Any]


class RawEvent(NamedTuple):
    """An undecoded message from a feed: its position, subject and payload.

    A NamedTuple, not a frozen dataclass: feeds make one per event and a frozen
    dataclass's ``__init__`` costs several times a tuple's.
    """

    seq: int
    subject: str
    data: bytes
    #: stored time, nanoseconds since the epoch
    timestamp_ns: int = 0
    #: messages matching the feed's filter still to come after this one (at delivery)
    pending: int = 0


class EventStore:
    """Appends and reads events on JetStream."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects | None = None,
        config: StoreConfig | None = None,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=(config or StoreConfig()).ack_timeout)
        self.subjects = subjects or Subjects()
        self.config = config or StoreConfig()
        self.stream = self.subjects.stream
        self._batch_slots = asyncio.Semaphore(self.config.max_inflight_batches)
        self._acks: _Acks | None = None

    # -- provisioning ----------------------------------------------------------------------
    def stream_config(self) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            description="Pantheon-ES event log: one subject per aggregate instance.",
            subjects=[self.subjects.all_events],
            storage=StorageType.FILE,
            num_replicas=self.config.replicas,
            duplicate_window=self.config.duplicate_window,
            discard=DiscardPolicy.OLD,
            allow_direct=True,
            allow_atomic=True,
            # Committed-event notices: the server republishes each event once stored.
            republish=RePublish(
                src=self.subjects.events(None, "*"),  # <root>.ev.*.*.*
                dest=self.subjects.changed_pattern,
            ),
        )

    async def provision(self) -> None:
        """Create the stream, or bring the settings the store owns up to date."""
        wanted = self.stream_config()
        try:
            info = await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_stream(wanted)
                log.info("stream created", stream=self.stream)
                return
            except nats.js.errors.BadRequestError:
                # Another node created it between our two calls; fall through to compare.
                info = await self.js.stream_info(self.stream)
        have = info.config
        if (
            have.subjects != wanted.subjects
            or have.duplicate_window != wanted.duplicate_window
            or not have.allow_atomic
            or not have.allow_direct
            or (have.num_replicas or 1) != wanted.num_replicas
            or have.republish is None
            or have.republish.dest != wanted.republish.dest  # type: ignore[union-attr]
        ):
            await self.js.update_stream(wanted)
            log.info("stream updated", stream=self.stream)

    # -- append ---------------------------------------------------------------------------------
    async def append(self, events: Sequence[Event[Any]], *, expected_seq: int) -> AppendResult:
        """Append the events of one decision to their aggregate's subject.

        Args:
            events: one or more events of the same aggregate instance.
            expected_seq: the stream sequence of the aggregate's last event (0 if new).

        Raises:
            ConcurrencyError: the aggregate moved past ``expected_seq``.
            UnavailableError: JetStream did not acknowledge after all attempts.
        """
        subject = self._decision_subject(events)
        payloads = [encode(ev) for ev in events]
        msg_ids = [ev.event_id for ev in events]
        attempts = self.config.append_attempts
        for attempt in range(1, attempts + 1):
            try:
                if len(payloads) == 1:
                    headers = {H_MSG_ID: msg_ids[0], H_EXPECTED_SUBJECT_SEQ: str(expected_seq)}
                    last = await self._publish_one(subject, payloads[0], headers)
                else:
                    last = await self._publish_batch(subject, payloads, msg_ids, expected_seq)
                return AppendResult(last - len(payloads) + 1, last)
            except _WrongLastSequence as exc:
                # Both answers can mean "an earlier attempt of this append was written".
                landed = await self.landed_seq(subject, expected_seq, msg_ids)
                if landed is not None:
                    # An earlier attempt of ours was written; its ack was lost.
                    return AppendResult(landed, landed + len(msg_ids) - 1, already_written=True)
                if isinstance(exc, _DuplicateInBatch):
                    raise InternalError(
                        f"append to {subject} reuses stored message ids: {exc.description}"
                    ) from None
                raise ConcurrencyError(
                    f"{subject} moved past sequence {expected_seq}",
                    details={
                        "subject": subject,
                        "expected_seq": expected_seq,
                        "server": exc.description,
                    },
                ) from None
            except _NO_ACK as exc:
                log.warning(
                    "append not acknowledged", subject=subject, attempt=attempt, error=repr(exc)
                )
                if attempt == attempts:
                    raise UnavailableError(
                        f"JetStream did not acknowledge the append to {subject}",
                        retry_after=1.0,
                    ) from exc
                await asyncio.sleep(0.05 * attempt)
        raise AssertionError("unreachable")

    def flush(self) -> None:
        """Send what this connection has queued now (``Connection.flush_now``)."""
        if isinstance(self.nc, Connection):
            self.nc.flush_now()

    async def append_after(self, event: Event[Any], after_msg_id: str) -> AppendResult:
        """Append ``event`` only if the stream's last message is ``after_msg_id``
        (``Nats-Expected-Last-Msg-Id``): it is then stored directly behind that message,
        and its aggregate is as it was decided on, without knowing that message's
        sequence yet (a lease appended right behind the submission it was decided with,
        its ack not awaited: docs/decisions.md, "A new task's lease in its submission's
        wake").

        Raises ``ConcurrencyError`` when another message is last (nothing appended),
        ``UnavailableError`` without an ack (it may be stored: the log tells). One
        attempt.
        """
        subject = self._decision_subject([event])
        headers = {H_MSG_ID: event.event_id, H_EXPECTED_LAST_MSG_ID: after_msg_id}
        try:
            seq = await self._publish_one(subject, encode(event), headers)
        except _NO_ACK as exc:
            raise UnavailableError(
                f"JetStream did not acknowledge the append to {subject}"
            ) from exc
        return AppendResult(seq, seq)

    def _decision_subject(self, events: Sequence[Event[Any]]) -> str:
        """The subject of one decision's events: 1 to MAX_BATCH events of one aggregate."""
        if not events or len(events) > MAX_BATCH:
            raise ValueError(f"one decision appends 1 to {MAX_BATCH} events")
        first = events[0]
        key = (first.tenant, first.aggregate, first.aggregate_id)
        if any((e.tenant, e.aggregate, e.aggregate_id) != key for e in events):
            raise ValueError("all events of one decision must belong to one aggregate")
        return self.subjects.aggregate(*key)

    async def _publish_one(self, subject: str, payload: bytes, headers: dict[str, str]) -> int:
        """One message with its expectation headers; its stream sequence, or the mapped
        error (``_map_api_error``)."""
        if self._acks is None:
            self._acks = _Acks(self.nc)
        data = await self._acks.publish(subject, payload, headers, self.config.ack_timeout)
        ack = orjson.loads(data)
        error = ack.get("error")
        if error:
            raise _map_api_error(error.get("err_code"), error.get("description", ""))
        return int(ack["seq"])

    async def _publish_batch(
        self, subject: str, payloads: Sequence[bytes], msg_ids: Sequence[str], expected_seq: int
    ) -> int:
        return await self._publish_atomic(
            [
                (subject, payload, msg_id, expected_seq if i == 0 else None)
                for i, (payload, msg_id) in enumerate(zip(payloads, msg_ids, strict=True))
            ]
        )

    async def _publish_atomic(self, messages: Sequence[tuple[str, bytes, str, int | None]]) -> int:
        """Publish (subject, payload, msg id, expected subject seq or None) as one atomic
        batch; returns the last message's sequence (the batch's are consecutive)."""
        batch_id = ids.new_id()
        n = len(messages)
        async with self._batch_slots:
            for i, (subject, payload, msg_id, expected) in enumerate(messages, start=1):
                headers = {H_MSG_ID: msg_id, H_BATCH_ID: batch_id, H_BATCH_SEQ: str(i)}
                if expected is not None:
                    headers[H_EXPECTED_SUBJECT_SEQ] = str(expected)
                if i < n:
                    await self.nc.publish(subject, payload, headers=headers)
                else:
                    headers[H_BATCH_COMMIT] = "1"
                    reply = await self.nc.request(
                        subject, payload, headers=headers, timeout=self.config.ack_timeout
                    )
        ack = orjson.loads(reply.data) if reply.data else {}
        error = ack.get("error")
        if error:
            raise _map_api_error(error.get("err_code"), error.get("description", ""))
        if ack.get("batch") != batch_id or ack.get("count") != n:
            raise InternalError(f"unexpected batch ack for {messages[-1][0]}: {ack!r}")
        return int(ack["seq"])

    async def append_new(self, decisions: Sequence[Sequence[Event[Any]]]) -> list[int]:
        """Append the decisions that create new aggregates, many to an atomic batch.

        Each decision's events belong to one aggregate that must not exist yet: its
        first message expects subject sequence 0. Decisions are packed, whole, into
        atomic batches of up to MAX_BATCH messages, appended one after the other.
        Returns each decision's last sequence.

        Raises:
            ConcurrencyError: an aggregate of a batch exists already; nothing of that
                batch is stored (batches before it are).
            UnavailableError: a batch was not acknowledged (it may have been stored).
        """
        chunks: list[list[tuple[str, bytes, str, int | None]]] = [[]]
        ends: list[tuple[int, int]] = []  # (chunk, index of the decision's last message)
        for events in decisions:
            subject = self._decision_subject(events)
            if len(chunks[-1]) + len(events) > MAX_BATCH:
                chunks.append([])
            chunks[-1] += [
                (subject, encode(e), e.event_id, 0 if i == 0 else None)
                for i, e in enumerate(events)
            ]
            ends.append((len(chunks) - 1, len(chunks[-1]) - 1))
        firsts: list[int] = []
        for chunk in chunks:
            if not chunk:
                continue
            try:
                last = await self._publish_atomic(chunk)
            except _WrongLastSequence as exc:
                raise ConcurrencyError(
                    "an aggregate to create exists already", details={"server": exc.description}
                ) from None
            except _NO_ACK as exc:
                raise UnavailableError(
                    "JetStream did not acknowledge a batch of new aggregates", retry_after=1.0
                ) from exc
            firsts.append(last - len(chunk) + 1)
        return [firsts[c] + i for c, i in ends]

    async def landed_seq(
        self, subject: str, expected_seq: int, msg_ids: Sequence[str]
    ) -> int | None:
        """First seq of ``msg_ids`` if they are the subject's next messages after ``expected_seq``.

        That is how an append whose ack was lost is recognised as written.
        """
        stored = await self._direct_get_batch(subject, expected_seq + 1, len(msg_ids))
        if [m.headers.get(H_MSG_ID) if m.headers else None for m in stored] == list(msg_ids):
            return _seq_of(stored[0])
        return None

    # -- reads ------------------------------------------------------------------------------------
    async def read_aggregate(
        self, tenant: str, aggregate: str, aggregate_id: str, *, from_seq: int = 1
    ) -> list[StoredEvent]:
        """Every event of one aggregate instance, oldest first."""
        subject = self.subjects.aggregate(tenant, aggregate, aggregate_id)
        out: list[StoredEvent] = []
        seq = from_seq
        while True:
            msgs = await self._direct_get_batch(subject, seq, MAX_BATCH)
            for m in msgs:
                s = _seq_of(m)
                out.append(StoredEvent(s, subject, decode(m.data, s)))
            if len(msgs) < MAX_BATCH:
                return out
            seq = _seq_of(msgs[-1]) + 1

    async def last_seq(self) -> int:
        """The stream's last sequence (0 when empty)."""
        info = await self.js.stream_info(self.stream)
        return int(info.state.last_seq or 0)

    async def subject_last_seq(self, subject: str) -> int:
        """The last sequence stored on ``subject`` (0 if none); a wildcard subject such as
        one tenant's ``<root>.ev.T.>`` gives the last of all it matches.

        One direct get by last subject, whose API subject carries ``subject`` and takes
        no body, so a permission can allow it for one tenant's subjects only.

        Raises:
            ForbiddenError: NATS permissions do not let this user read ``subject``.
            UnavailableError: no answer.
        """
        api = f"{JS_API}.DIRECT.GET.{self.stream}.{subject}"
        try:
            msg = await _request(self.nc, api, b"", self.config.ack_timeout)
        except ForbiddenError as exc:
            raise _forbidden_read(exc, self.stream, subject) from None
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise UnavailableError(f"direct get on {self.stream} failed: {exc!r}") from None
        headers = msg.headers or {}
        if headers.get("Status") == "404":
            return 0
        if "Nats-Sequence" not in headers:
            raise UnavailableError(f"direct get on {self.stream} answered {headers}")
        return int(headers["Nats-Sequence"])

    async def stream_last_seq(self, subject: str | None = None) -> int:
        """The stream's last sequence (0 when empty), for the operator tools: a refusal by
        NATS permissions is a ``forbidden`` error at once, not a timeout.

        Without ``subject``, from the stream's info, as :meth:`last_seq`. With a filter
        ``subject``, through it, for a user whose permissions cover only that filter (one
        tenant's ``<root>.ev.T.>``): such a user may not ask for the stream's info, whose
        request body can ask for every subject of the stream (every tenant's aggregate
        ids). A pull consumer on ``subject`` with deliver policy ``new`` starts after the
        stream's last message, and its create reply says that sequence
        (``delivered.stream_seq``); it is never read and the server deletes it after a
        second. The stream's last sequence is no secret of other tenants: the sequences
        of a tenant's own events already show how the log grows.

        Raises:
            ForbiddenError: NATS permissions do not let this user ask.
            nats.js.errors.NotFoundError: no such stream.
            nats.errors.TimeoutError: no answer.
        """
        if subject is None:
            api = f"{JS_API}.STREAM.INFO.{self.stream}"
            try:
                msg = await _request(self.nc, api, b"", self.config.ack_timeout)
            except ForbiddenError as exc:
                raise _forbidden_read(exc, self.stream, self.subjects.all_events) from None
            info: dict[str, Any] = orjson.loads(msg.data)
            if info.get("error"):
                _raise_api_error(info["error"])
            return int((info.get("state") or {}).get("last_seq") or 0)
        reply = await self._create_consumer(
            {
                "name": ids.new_id(),
                "filter_subject": subject,
                "deliver_policy": "new",
                "ack_policy": "none",
                "inactive_threshold": 1_000_000_000,  # ns
                "mem_storage": True,
                "num_replicas": 1,
            }
        )
        return int((reply.get("delivered") or {}).get("stream_seq") or 0)

    async def first_seq(
        self,
        subject: str,
        *,
        start_seq: int | None = None,
        start_time: datetime | None = None,
    ) -> int | None:
        """The sequence of the first message on ``subject`` at or after stream sequence
        ``start_seq``, or stored at or after ``start_time`` (None: there is none).

        A consumer on ``subject`` (deliver policy by start sequence or time, headers
        only, at most one message in flight) is created through the API subject that
        carries its filter, so this needs only the permissions of a read of
        ``subject``; the first message it delivers names its stream sequence, and none
        is awaited when its create reply counts nothing pending. Not a direct get: its
        filter subject travels in the request body, where no permission can see it.

        Raises:
            ForbiddenError: NATS permissions do not let this user read ``subject``.
            UnavailableError: the message counted was not delivered in time.
        """
        if (start_seq is None) == (start_time is None):
            raise ValueError("give start_seq or start_time")
        start: dict[str, Any]
        if start_time is not None:
            when = start_time.astimezone(UTC).isoformat().replace("+00:00", "Z")
            start = {"deliver_policy": "by_start_time", "opt_start_time": when}
        else:
            start = {"deliver_policy": "by_start_sequence", "opt_start_seq": max(1, start_seq or 1)}
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        try:
            reply = await self._create_consumer(
                {
                    "name": ids.new_id(),
                    "deliver_subject": inbox,
                    "filter_subject": subject,
                    **start,
                    "ack_policy": "explicit",  # never acked: one message is enough
                    "max_ack_pending": 1,
                    "headers_only": True,
                    "mem_storage": True,
                    "num_replicas": 1,
                },
                watch=[inbox],
            )
            if not reply.get("num_pending"):
                return None
            try:
                msg = await sub.next_msg(timeout=self.config.ack_timeout)
            except nats.errors.TimeoutError:
                raise UnavailableError(
                    f"the first message on {subject} was not delivered in time"
                ) from None
            return _ack_fields(msg.reply.split("."))[0]
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()  # the server then deletes the consumer

    async def _create_consumer(
        self, config: dict[str, Any], *, watch: Iterable[str] = ()
    ) -> dict[str, Any]:
        """Create a consumer with its one filter subject through the filtered create
        subject, mapping a refusal (:func:`create_consumer`)."""
        try:
            return await create_consumer(
                self.nc, self.stream, config, timeout=self.config.ack_timeout, watch=watch
            )
        except ForbiddenError as exc:
            raise _forbidden_read(exc, self.stream, config["filter_subject"]) from None

    async def _direct_get_batch(self, subject: str, start_seq: int, limit: int) -> list[Msg]:
        """Up to ``limit`` messages of ``subject`` from ``start_seq`` in one direct-get request."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        try:
            request = orjson.dumps({"seq": start_seq, "next_by_subj": subject, "batch": limit})
            await self.nc.publish(f"$JS.API.DIRECT.GET.{self.stream}", request, reply=inbox)
            out: list[Msg] = []
            while True:
                try:
                    msg = await sub.next_msg(timeout=self.config.ack_timeout)
                except nats.errors.TimeoutError as exc:
                    raise UnavailableError(f"direct get on {self.stream} timed out") from exc
                status = msg.headers.get("Status") if msg.headers else None
                if status is None:
                    out.append(msg)
                    if len(out) >= limit:
                        return out
                elif status in ("204", "404"):  # end of batch / nothing there
                    return out
                else:
                    raise UnavailableError(
                        f"direct get on {self.stream} failed: {status} {msg.headers}"
                    )
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def feed(
        self,
        *,
        from_seq: int = 1,
        subject: str | None = None,
        max_buffer: int = 20_000,
        heartbeat: float = 5.0,
    ) -> EventFeed:
        """An ordered feed of the stream from ``from_seq`` (live after catching up).

        ``heartbeat``: the consumer's idle heartbeat in seconds; a feed that hears
        nothing for two of them starts a new consumer.
        """
        return EventFeed(
            self.nc,
            self.js,
            self.stream,
            subject or self.subjects.all_events,
            from_seq,
            max_buffer,
            heartbeat=heartbeat,
            api_timeout=self.config.ack_timeout,
        )


class EventFeed:
    """Ordered push consumer buffering raw messages, handed out in batches.

    Memory is bounded by pausing, not by flow control: nats-py 2.16 answers
    JetStream flow control as soon as a message is received, so a callback
    that waited for room would only fill the subscription's pending queue until
    it overflowed (slow consumer: messages dropped, and an ordered consumer that
    was seen not to recover). Instead the callback never waits: when the buffer
    holds ``max_buffer`` events the feed unsubscribes, ignores whatever of that
    subscription is still in flight, and once the reader has taken half of the
    buffer it subscribes again from the sequence after the last one kept
    (docs/decisions.md, "Bounded feeds").

    On a :class:`~pantheon_es.connection.Connection` the feed runs its own
    ordered consumer over a raw subscription (docs/decisions.md, "The feed reads
    raw messages"): an ephemeral push consumer with flow control and idle
    heartbeats whose messages are kept as they are parsed. It starts again after
    the last event kept when a consumer sequence is skipped, when a heartbeat
    names a consumer sequence it has not seen, or when neither a message nor a
    heartbeat came for two heartbeat intervals (the consumer is gone, e.g. after
    a reconnect). On any other nats-py client it uses nats-py's ordered consumer.
    """

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        stream: str,
        subject: str,
        from_seq: int,
        max_buffer: int,
        *,
        heartbeat: float = 5.0,
        api_timeout: float = 5.0,
    ) -> None:
        self._nc = nc
        self._api_timeout = api_timeout
        self._js = js
        self._stream = stream
        self._subject = subject
        self._last = max(1, from_seq) - 1  # the last stream sequence kept
        self._max_buffer = max(1, max_buffer)
        self._buffer: list[RawEvent] = []
        self._ready = asyncio.Event()
        self._sub: Any = None
        self._generation = 0  # of the current subscription; older ones' messages are ignored
        self._paused = False
        self._dropping: asyncio.Task[None] | None = None
        self._resuming = asyncio.Lock()
        self._closed = False
        self._raw: Connection | None = nc if isinstance(nc, Connection) else None
        self._heartbeat = heartbeat
        self._dseq = 0  # the last consumer sequence of the current consumer (raw feeds)
        self._alive = True  # a message or heartbeat came since the watchdog last looked
        self._watchdog: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        #: How many times the feed paused for a full buffer (for tests and benchmarks).
        self.pauses = 0
        #: How many times a raw feed started a new consumer after a gap or silence.
        self.resets = 0
        #: Messages matching the filter from ``from_seq`` on when the first consumer was
        #: created (its create reply's ``num_pending``; raw feeds only, else None).
        self.initial_pending: int | None = None
        self._error: PantheonError | None = None  # handed to the reader (a refusal)
        self._denials: contextlib.ExitStack | None = None
        self._watched: tuple[str, str] = ("", "")  # (deliver subject, flow-control prefix)

    async def __aenter__(self) -> EventFeed:
        try:
            await self.start()
        except BaseException:
            await self.stop()  # e.g. refused: no handler left on the connection
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._generation += 1
        generation = self._generation
        if self._raw is not None:
            await self._start_raw(self._raw, generation)
            return

        async def on_msg(msg: Msg) -> None:
            if generation == self._generation and not self._paused:
                self._keep(msg)

        self._sub = await self._js.subscribe(
            self._subject,
            stream=self._stream,
            cb=on_msg,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            config=ConsumerConfig(opt_start_seq=self._last + 1),
            pending_msgs_limit=max(100_000, self._max_buffer * 4),
            pending_bytes_limit=512 * 1024 * 1024,
        )

    def _keep(self, msg: Msg) -> None:
        seq, _dseq, timestamp_ns, pending = _ack_fields(msg.reply.split("."))
        if seq > self._last:  # an ordered-consumer reset may deliver again what was kept
            self._append(RawEvent(seq, msg.subject, msg.data, timestamp_ns, pending))

    def _append(self, event: RawEvent) -> None:
        self._last = event.seq
        buffer = self._buffer
        buffer.append(event)
        if len(buffer) == 1:  # a reader waits only on an empty buffer
            self._ready.set()
        if len(buffer) >= self._max_buffer:
            self._paused = True
            self.pauses += 1
            self._drop_subscription()

    def _drop_subscription(self) -> None:
        self._generation += 1  # what the old subscription still delivers is dropped
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._dropping = asyncio.get_running_loop().create_task(self._unsubscribe())

    # -- the raw ordered consumer ------------------------------------------------------------------
    async def _start_raw(self, nc: Connection, generation: int) -> None:
        def on_message(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
            if generation != self._generation or self._paused:
                return
            self._alive = True
            if reply.startswith(b"$JS.ACK."):
                self._keep_raw(subject, reply, data)
            elif headers is not None:
                self._control(reply, headers)

        self._dseq = 0
        self._alive = True
        inbox = nc.new_inbox()
        name = ids.new_id()
        if self._denials is None:
            self._denials = contextlib.ExitStack()
            self._denials.enter_context(nc.on_denied(self._denied))
        self._watched = (inbox.lower(), f"$js.fc.{self._stream.lower()}.{name.lower()}.")
        self._sub = await nc.raw_subscribe(inbox, on_message)
        try:
            # Named, and created through the create subject that carries the filter: a
            # permission can then allow one tenant's feeds only (create_consumer).
            reply = await create_consumer(
                nc,
                self._stream,
                {
                    "name": name,
                    "deliver_subject": inbox,
                    "filter_subject": self._subject,
                    "deliver_policy": "by_start_sequence",
                    "opt_start_seq": self._last + 1,
                    "ack_policy": "none",
                    "max_deliver": 1,
                    "flow_control": True,
                    "idle_heartbeat": int(self._heartbeat * 1e9),  # ns
                    "mem_storage": True,
                    "num_replicas": 1,
                },
                timeout=self._api_timeout,
                watch=[inbox],
            )
        except BaseException as exc:
            await self._unsubscribe()
            if isinstance(exc, ForbiddenError):
                raise _forbidden_read(exc, self._stream, self._subject) from None
            raise
        if self.initial_pending is None:
            self.initial_pending = int(reply.get("num_pending") or 0)
        if generation == self._generation:
            self._watchdog = asyncio.get_running_loop().call_later(
                2 * self._heartbeat, self._look, generation
            )

    def _keep_raw(self, subject: bytes, reply: bytes, data: bytes) -> None:
        seq, dseq, timestamp_ns, pending = _ack_fields(reply.split(b"."))
        if dseq != self._dseq + 1:
            self._reset()  # a message of this consumer went missing
            return
        self._dseq = dseq
        if seq > self._last:
            self._append(RawEvent(seq, subject.decode(), data, timestamp_ns, pending))

    def _control(self, reply: bytes, headers: bytes) -> None:
        """A status message: flow control request or idle heartbeat."""
        status = headers[: headers.find(b"\r\n")]
        if b"FlowControl" in status:
            if reply:  # everything delivered before it is kept already
                self._spawn(self._nc.publish(reply.decode()))
            return
        if b"Idle Heartbeat" not in status:
            return
        fields = _header_fields(headers)
        stalled = fields.get(b"Nats-Consumer-Stalled")
        if stalled:
            self._spawn(self._nc.publish(stalled.decode()))
        last = fields.get(b"Nats-Last-Consumer")
        if last is not None and int(last) != self._dseq:
            self._reset()  # the server delivered messages this feed never saw

    def _denied(self, what: str, subject: str) -> None:
        """The server refused this feed's inbox or a flow-control reply: nothing more can
        come, so the reader gets a ``forbidden`` error instead of waiting."""
        inbox, flow_control = self._watched
        if subject == inbox or (what == "publish" and subject.startswith(flow_control)):
            refused = ForbiddenError(f"the server refused it a {what} to {subject}")
            self._fail(_forbidden_read(refused, self._stream, self._subject))

    def _fail(self, error: PantheonError) -> None:
        if self._error is None:
            self._error = error
        self._paused = True
        self._drop_subscription()
        self._ready.set()

    def _look(self, generation: int) -> None:
        """The watchdog: silent for two heartbeat intervals means the consumer is gone."""
        if generation != self._generation or self._paused or self._closed:
            return
        if not self._alive:
            self._reset()
            return
        self._alive = False
        self._watchdog = asyncio.get_running_loop().call_later(
            2 * self._heartbeat, self._look, generation
        )

    def _reset(self) -> None:
        """Start a new consumer after the last event kept."""
        if self._paused or self._closed:
            return
        self.resets += 1
        log.info("event feed restarts its consumer", after_seq=self._last, stream=self._stream)
        self._paused = True
        self._drop_subscription()
        self._spawn(self._resume())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unsubscribe(self) -> None:
        old, self._sub = self._sub, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()

    async def _resume(self) -> None:
        """Subscribe again from the sequence after the last one kept."""
        async with self._resuming:
            if not self._paused:
                return  # resumed meanwhile
            if self._dropping is not None:
                await self._dropping
                self._dropping = None
            if self._closed:
                return
            self._paused = False
            try:
                await self.start()
            except Exception as exc:
                self._paused = True
                if isinstance(exc, ForbiddenError):
                    self._fail(exc)
                    return
                if self._raw is None:
                    raise
                # The server is away: try again after two heartbeat intervals.
                log.warning("event feed could not subscribe", error=repr(exc))
                self._watchdog = asyncio.get_running_loop().call_later(
                    2 * self._heartbeat, self._retry, self._generation
                )

    def _retry(self, generation: int) -> None:
        if generation == self._generation and self._paused and not self._closed:
            self._spawn(self._resume())

    async def next_batch(
        self, max_items: int = 1000, timeout: float | None = None
    ) -> list[RawEvent]:
        """Wait for events and take up to ``max_items`` of them (``[]`` on timeout).

        Raises:
            ForbiddenError: the server refused what the feed needs to go on (its deliver
                subject, a flow-control reply, a new consumer), once the events received
                before are taken.
        """
        if not self._buffer and not self._closed and self._error is None:
            self._ready.clear()
            if timeout is None:
                await self._ready.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ready.wait(), timeout)
        return await self.take(max_items)

    async def take(self, max_items: int = 1000) -> list[RawEvent]:
        """Up to ``max_items`` of the events already received, without waiting for more."""
        if self._error is not None and not self._buffer:
            raise self._error
        batch = self._buffer[:max_items]
        del self._buffer[:max_items]
        resume = self._paused and len(self._buffer) <= self._max_buffer // 2
        if resume and self._error is None and not self._closed:
            await self._resume()
        return batch

    async def batches(self, max_items: int = 1000) -> AsyncIterator[list[RawEvent]]:
        while not self._closed:
            batch = await self.next_batch(max_items)
            if batch:
                yield batch

    async def stop(self) -> None:
        self._closed = True
        self._ready.set()
        if self._denials is not None:
            self._denials.close()
            self._denials = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for task in list(self._tasks):
            task.cancel()
        if self._dropping is not None:
            with contextlib.suppress(Exception):
                await self._dropping
            self._dropping = None
        await self._unsubscribe()


def _header_fields(block: bytes) -> dict[bytes, bytes]:
    """The ``Name: value`` lines of a status message's header block (names as sent)."""
    out: dict[bytes, bytes] = {}
    for line in block.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            out[name.strip()] = value.strip()
    return out


class _WrongLastSequence(PantheonError):
    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class _DuplicateInBatch(_WrongLastSequence):
    """10201: a message id of the batch is already stored (checked before the sequence)."""


class _Acks:
    """Publishes with a reply subject of its own and hands each JetStream ack to the
    waiting append: one wildcard subscription instead of ``js.publish``'s request
    machinery (a ``wait_for`` and a PubAck object each time). Measured with tools/bench
    (docs/decisions.md, "Appends"). Timeouts: one sweep timer for all appends in
    flight, not a timer each (docs/decisions.md, "The per-task cost")."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox()
        #: token -> (future, deadline); insertion order is deadline order per timeout
        self._pending: dict[str, tuple[asyncio.Future[bytes], float]] = {}
        self._next = itertools.count(1)
        self._sub: Any = None
        self._subscribing: asyncio.Lock = asyncio.Lock()
        self._sweep: asyncio.TimerHandle | None = None

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str], timeout: float
    ) -> bytes:
        if self._sub is None:
            async with self._subscribing:
                if self._sub is None:
                    acks = f"{self.prefix}.*"
                    if isinstance(self.nc, Connection):
                        self._sub = await self.nc.raw_subscribe(acks, self._on_raw_ack)
                    else:
                        self._sub = await self.nc.subscribe(acks, cb=self._on_ack)
        token = str(next(self._next))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        self._pending[token] = (future, loop.time() + timeout)
        if self._sweep is None:
            self._sweep = loop.call_later(min(timeout, _SWEEP), self._expire, min(timeout, _SWEEP))
        try:
            await self.nc.publish(subject, payload, reply=f"{self.prefix}.{token}", headers=headers)
            return await future
        finally:
            self._pending.pop(token, None)

    async def _on_ack(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        self._settle(msg.subject, msg.data, status == "503")

    def _on_raw_ack(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        # A status-only reply is "NATS/1.0 503" (no responders: no stream on the subject).
        self._settle(subject.decode(), data, headers is not None and headers[9:12] == b"503")

    def _settle(self, subject: str, data: bytes, no_responders: bool) -> None:
        entry = self._pending.pop(subject[len(self.prefix) + 1 :], None)
        if entry is None or entry[0].done():
            return
        if no_responders:
            entry[0].set_exception(nats.errors.NoRespondersError())
        else:
            entry[0].set_result(data)

    def _expire(self, interval: float) -> None:
        """Fail the appends whose deadline passed; run again while any is in flight."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        late = [token for token, (_f, deadline) in self._pending.items() if deadline <= now]
        for token in late:
            future, _deadline = self._pending.pop(token)
            if not future.done():
                future.set_exception(TimeoutError())
        if self._pending:
            self._sweep = loop.call_later(interval, self._expire, interval)


#: How often the appends in flight are checked for a missing ack (a timeout fires up
#: to this much late).
_SWEEP = 0.25


def _map_api_error(err_code: int | None, description: str) -> PantheonError:
    """The one place JetStream error codes become Pantheon errors."""
    if err_code in _WRONG_LAST_SEQUENCE:
        return _WrongLastSequence(description)
    if err_code == JS_BATCH_DUPLICATE_MSG_ID:
        return _DuplicateInBatch(description)
    if err_code == JS_WRONG_LAST_MSG_ID:  # append_after: another message is last
        return ConcurrencyError(f"the stream's last message is another: {description}")
    return UnavailableError(f"JetStream refused the append ({err_code}): {description}")


def _ack_fields(t: Sequence[str] | Sequence[bytes]) -> tuple[int, int, int, int]:
    """(stream seq, consumer seq, timestamp ns, pending) from the tokens of a JetStream
    ack subject (split on dots, as text or bytes), v1 or v2 layout."""
    # v1: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>
    # v2: $JS.ACK.<domain>.<acchash>.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>...
    if len(t) == 9:
        return int(t[5]), int(t[6]), int(t[7]), int(t[8])
    return int(t[7]), int(t[8]), int(t[9]), int(t[10])


async def _request(
    nc: NATS, subject: str, payload: bytes, timeout: float, watch: Iterable[str] = ()
) -> Msg:
    """A request that, on a :class:`Connection`, fails fast with ``forbidden`` when the
    server refuses it for lack of permission (:meth:`Connection.request_checked`)."""
    if isinstance(nc, Connection):
        return await nc.request_checked(subject, payload, timeout=timeout, watch=watch)
    return await nc.request(subject, payload, timeout=timeout)


async def create_consumer(
    nc: NATS,
    stream: str,
    config: dict[str, Any],
    *,
    timeout: float,
    watch: Iterable[str] = (),
) -> dict[str, Any]:
    """Create the consumer ``config`` describes (``name`` and one ``filter_subject``
    required; the JetStream API's JSON) and return the server's create reply.

    It goes through ``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter subject>``
    (nats-server 2.9+): the server refuses a body whose filter differs from the one in
    the subject, so a permission on that subject holds a user to a filter, e.g. one
    tenant's ``<root>.ev.T.>``. ``watch``: subscriptions the consumer's delivery needs
    (its deliver subject), whose refusal also fails the call.

    Raises:
        ForbiddenError: the server refused the request or a watched subscription.
        nats.js.errors.APIError: JetStream's refusal (``NotFoundError``: no stream).
        nats.errors.TimeoutError: no answer.
    """
    subject = f"{JS_API}.CONSUMER.CREATE.{stream}.{config['name']}.{config['filter_subject']}"
    body = orjson.dumps({"stream_name": stream, "config": config})
    msg = await _request(nc, subject, body, timeout, watch)
    reply: dict[str, Any] = orjson.loads(msg.data)
    error = reply.get("error")
    if error:
        _raise_api_error(error)
    return reply


def _raise_api_error(error: dict[str, Any]) -> NoReturn:
    """Raise the nats-py error of a JetStream API reply's ``error`` (``from_error``
    always raises; the last line only tells the type checker so)."""
    nats.js.errors.APIError.from_error(error)
    raise nats.js.errors.APIError(**error)


def _forbidden_read(exc: ForbiddenError, stream: str, subject: str) -> ForbiddenError:
    """A refusal said as what it stops: reading ``subject`` of ``stream``."""
    return ForbiddenError(
        f"NATS permissions do not let this user read {subject} of stream {stream}: "
        f"{exc.message} (a user held to tenant T may read T's subjects only; "
        'docs/operations.md, "NATS permissions for one tenant")',
        details={"stream": stream, "subject": subject, **(exc.details or {})},
    )


def _seq_of(msg: Msg) -> int:
    return int(msg.headers["Nats-Sequence"]) if msg.headers else 0
