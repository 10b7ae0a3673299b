"""Read model ``messages``: every message between agents with its delivery times.

Query ``mailbox.list``: messages by recipient, sender and status, in send
order, for inboxes and the audit trail (who sent what to whom, at which
priority, when it was sent, delivered and read).
"""

from __future__ import annotations

from typing import Any, Literal

import aiosqlite
from pydantic import BaseModel, ConfigDict, Field

from pantheon_es.events import EventRecord
from pantheon_es.mailbox import RANK, MessagePriority, MessagesDelivered, MessageSent, MessagesRead
from pantheon_es.tasks import TaskId
from projections.base import Batch, Key, Queries, ReadModel, Table, handles, paged

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


def _listed(ev: EventRecord) -> list[tuple[Table, Key]]:
    return [(MESSAGES, (ev.tenant, message_id)) for message_id in ev.data["message_ids"]]


class MessagesModel(ReadModel):
    name = "messages"
    tables = (MESSAGES,)

    @handles(MessageSent)
    def sent(self, uow: Batch, ev: EventRecord) -> None:
        d = ev.data
        uow.put(
            MESSAGES,
            {
                "id": d["message_id"],
                "tenant": ev.tenant,
                "recipient": ev.aggregate_id,
                "sender": d["sender"],
                "priority": d["priority"],
                "priority_rank": RANK[MessagePriority(d["priority"])],
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
                uow.put(
                    table, {**row, "status": status, column: ev.occurred_at, "last_seq": ev.seq}
                )

    @handles(MessagesDelivered, load=_listed)
    def delivered(self, uow: Batch, ev: EventRecord) -> None:
        self._mark(uow, ev, "delivered", "delivered_at")
        if ev.data.get("read"):
            self._mark(uow, ev, "read", "read_at")

    @handles(MessagesRead, load=_listed)
    def read(self, uow: Batch, ev: EventRecord) -> None:
        self._mark(uow, ev, "read", "read_at")


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
