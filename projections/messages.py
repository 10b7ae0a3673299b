"""Read model ``messages``: every message between agents with its delivery times.

Query ``mailbox.list``: messages by recipient, sender and status, in send
order, for inboxes and the audit trail (who sent what to whom, at which
priority, when it was sent, delivered and read).

Table ``mailboxes``: one row per recipient agent with its counts (pending,
pending by priority, delivered but unread, total) and its last message; this
row is the mailbox's state in the KV bucket, ``<tenant>.mailbox.<agent id>``.
Archiving the agent removes it (the log keeps the history).
"""

from __future__ import annotations

from typing import Any, Literal

import aiosqlite
from pydantic import BaseModel, ConfigDict, Field

from pantheon_es.events import EventRecord
from pantheon_es.mailbox import RANK, MessagePriority, MessagesDelivered, MessageSent, MessagesRead
from pantheon_es.tasks import TaskArchived, TaskId
from projections.base import (
    Batch,
    Key,
    Queries,
    ReadModel,
    Row,
    Table,
    aggregate_row,
    handles,
    paged,
)

MODEL = "mailbox"

MESSAGES = Table(
    name="messages",
    columns=(
        "id",
        "tenant",
        "recipient",
        "sender",
        "priority",
        "priority_rank",
        "type",
        "body",
        "status",
        "sent_at",
        "delivered_at",
        "read_at",
        "sent_seq",
        "last_seq",
    ),
    key=("tenant", "id"),
    ddl="""
    CREATE TABLE IF NOT EXISTS messages (
        id TEXT NOT NULL,
        tenant TEXT NOT NULL,
        recipient TEXT NOT NULL,
        sender TEXT NOT NULL,
        priority TEXT NOT NULL,
        priority_rank INTEGER NOT NULL,
        type TEXT NOT NULL,
        body TEXT NOT NULL,
        status TEXT NOT NULL,
        sent_at TEXT NOT NULL,
        delivered_at TEXT,
        read_at TEXT,
        sent_seq INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        PRIMARY KEY (tenant, id)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS messages_recipient ON messages (tenant, recipient, status, sent_seq);
    CREATE INDEX IF NOT EXISTS messages_sender ON messages (tenant, sender, sent_seq);
    """,
)


MAILBOXES = Table(
    name="mailboxes",
    columns=(
        "id",
        "tenant",
        "pending",
        "pending_by_priority",
        "unread",
        "total",
        "last_message",
        "last_delivered_at",
        "last_read_at",
        "updated_at",
        "last_seq",
    ),
    key=("tenant", "id"),
    json_columns=frozenset({"pending_by_priority", "last_message"}),
    ddl="""
    CREATE TABLE IF NOT EXISTS mailboxes (
        id TEXT NOT NULL,
        tenant TEXT NOT NULL,
        pending INTEGER NOT NULL,
        pending_by_priority TEXT NOT NULL,
        unread INTEGER NOT NULL,
        total INTEGER NOT NULL,
        last_message TEXT,
        last_delivered_at TEXT,
        last_read_at TEXT,
        updated_at TEXT NOT NULL,
        last_seq INTEGER NOT NULL,
        PRIMARY KEY (tenant, id)
    ) WITHOUT ROWID;
    """,
)


#: Priority names in order and their ranks, by name (an enum lookup per event costs more).
_PRIORITIES = tuple(p.value for p in MessagePriority)
_RANK_OF = {p.value: rank for p, rank in RANK.items()}


def _listed(ev: EventRecord) -> list[tuple[Table, Key]]:
    return [(MESSAGES, (ev.tenant, message_id)) for message_id in ev.data["message_ids"]]


def _message_row(ev: EventRecord) -> list[tuple[Table, Key]]:
    return [(MESSAGES, (ev.tenant, ev.data["message_id"]))]


def _listed_and_mailbox(ev: EventRecord) -> list[tuple[Table, Key]]:
    return [*_listed(ev), (MAILBOXES, (ev.tenant, ev.aggregate_id))]


def _empty_mailbox(ev: EventRecord) -> Row:
    return {
        "id": ev.aggregate_id,
        "tenant": ev.tenant,
        "pending": 0,
        "pending_by_priority": dict.fromkeys(_PRIORITIES, 0),
        "unread": 0,
        "total": 0,
        "last_message": None,
        "last_delivered_at": None,
        "last_read_at": None,
        "updated_at": ev.occurred_at,
        "last_seq": ev.seq,
    }


class MessagesModel(ReadModel):
    name = "messages"
    tables = (MESSAGES, MAILBOXES)
    kv_models = ((MAILBOXES, MODEL),)

    def _mailbox(self, uow: Batch, ev: EventRecord) -> Row:
        # Changed in place when loaded: the row belongs to this batch.
        row = uow.get(MAILBOXES, (ev.tenant, ev.aggregate_id)) or _empty_mailbox(ev)
        row["updated_at"] = ev.occurred_at
        row["last_seq"] = ev.seq
        return row

    def _put_mailbox(self, uow: Batch, row: Row) -> None:
        uow.put(MAILBOXES, row)
        uow.publish(row["tenant"], MODEL, row["id"], row)

    def _count(self, uow: Batch, ev: EventRecord, *, delivered: bool, read: bool) -> None:
        """Move the listed messages' counts: pending -> delivered (unread) -> read."""
        box = self._mailbox(uow, ev)
        for table, key in _listed(ev):
            message = uow.get(table, key)
            if message is None:
                continue
            status = message["status"]
            if delivered and status == "pending":
                box["pending"] -= 1
                box["pending_by_priority"][message["priority"]] -= 1
                box["last_delivered_at"] = ev.occurred_at
                if not read:
                    box["unread"] += 1
                else:
                    box["last_read_at"] = ev.occurred_at
            elif read and status == "delivered":
                box["unread"] -= 1
                box["last_read_at"] = ev.occurred_at
        self._put_mailbox(uow, box)

    @handles(MessageSent, load=aggregate_row(MAILBOXES), creates=_message_row)
    def sent(self, uow: Batch, ev: EventRecord) -> None:
        d = ev.data
        box = self._mailbox(uow, ev)
        box["pending"] += 1
        box["pending_by_priority"][d["priority"]] += 1
        box["total"] += 1
        box["last_message"] = {
            "id": d["message_id"],
            "sender": d["sender"],
            "priority": d["priority"],
            "type": d["type"],
            "sent_at": ev.occurred_at,
        }
        self._put_mailbox(uow, box)
        uow.put(
            MESSAGES,
            {
                "id": d["message_id"],
                "tenant": ev.tenant,
                "recipient": ev.aggregate_id,
                "sender": d["sender"],
                "priority": d["priority"],
                "priority_rank": _RANK_OF[d["priority"]],
                "type": d["type"],
                "body": d["body"],
                "status": "pending",
                "sent_at": ev.occurred_at,
                "delivered_at": None,
                "read_at": None,
                "sent_seq": ev.seq,
                "last_seq": ev.seq,
            },
        )

    def _mark(self, uow: Batch, ev: EventRecord, status: str, column: str) -> None:
        for table, key in _listed(ev):
            row = uow.get(table, key)
            if row is not None:
                row["status"] = status
                row[column] = ev.occurred_at
                row["last_seq"] = ev.seq
                uow.put(table, row)

    @handles(MessagesDelivered, load=_listed_and_mailbox)
    def delivered(self, uow: Batch, ev: EventRecord) -> None:
        read = bool(ev.data.get("read"))
        self._count(uow, ev, delivered=True, read=read)
        self._mark(uow, ev, "delivered", "delivered_at")
        if read:
            self._mark(uow, ev, "read", "read_at")

    @handles(MessagesRead, load=_listed_and_mailbox)
    def read(self, uow: Batch, ev: EventRecord) -> None:
        self._count(uow, ev, delivered=False, read=True)
        self._mark(uow, ev, "read", "read_at")

    @handles(TaskArchived, load=aggregate_row(MAILBOXES))
    def archived(self, uow: Batch, ev: EventRecord) -> None:
        # The agent's mailbox leaves with it (its messages: see TasksModel.archived).
        if uow.get(MAILBOXES, (ev.tenant, ev.aggregate_id)) is None:
            return
        uow.delete(MAILBOXES, (ev.tenant, ev.aggregate_id))
        uow.publish(ev.tenant, MODEL, ev.aggregate_id, None)


class ListMessages(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    recipient: TaskId | None = None
    sender: str | None = None
    status: Literal["pending", "delivered", "read"] | None = None
    limit: int = Field(100, ge=1, le=1000)
    offset: int = Field(0, ge=0)
    min_seq: int | None = Field(None, ge=0)


async def list_messages(
    db: aiosqlite.Connection, tenant: str, query: ListMessages
) -> dict[str, Any]:
    where = ["tenant = ?"]
    params: list[Any] = [tenant]
    for column in ("recipient", "sender", "status"):
        value = getattr(query, column)
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    return await paged(
        db,
        MESSAGES,
        " AND ".join(where),
        params,
        order="sent_seq",
        limit=query.limit,
        offset=query.offset,
    )


QUERIES: Queries = {("mailbox", "list"): (ListMessages, list_messages)}
