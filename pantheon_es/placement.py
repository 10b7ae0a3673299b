"""Which pending task runs next, and where: the scheduler's policy, pure.

No I/O and no clock: the caller passes ``now`` (seconds on any monotone
clock) and applies the outcome. The live scheduler drives it from the event
log; the property tests and ``whatif`` drive it from a simulation.

Order (docs/decisions.md, "Scheduling policy"):

* **Priority with aging.** A ready job's effective priority is
  ``priority + aging_per_s * seconds_ready``. Ranking by effective priority at
  any instant equals ranking by ``aging_per_s * since - priority``, which does
  not change with time, so every queue is a heap on that key.
* **Bands, then fair share.** Effective priorities fall into bands of
  ``band`` points (the named levels are one band each). A higher band always
  goes first. Within a band, tenants share by weight and, inside a tenant,
  fairness keys share by weight (stride scheduling: each placement advances
  the group's virtual time by ``1/weight``; the lowest virtual time goes
  next). Within one fairness group the order is the heap's.
* **Overtaking bound.** A job J (priority p) is never overtaken by a job that
  became ready more than ``(P - p + band) / aging_per_s`` seconds after it,
  where P is the highest priority in use: by then J's effective priority is a
  whole band above the newcomer's for ever. With the defaults (1 point/s,
  band 100) a ``low`` job is at the front of everything submitted 400 s after
  it, even under a steady stream of ``urgent`` work.
* **Limits.** A job over its tenant's running quota, the global limit on
  running agents or its concurrency key's limit is *parked* under that limit
  and leaves the ready queues; when a running job holding the limit ends, the
  best parked jobs (as many as there are free units) return. A job that no
  accepting worker could hold even when empty is parked as ``no_worker_fits``
  until a worker joins.
* **Placement.** Best fit: of the accepting workers with a free slot and room,
  the one left with the least spare capacity (bin-packing); never more than a
  worker has. If the front job fits some worker's capacity but none has room
  now, it *reserves* the worker nearest to fitting: jobs ranked below it may
  not use that worker, so a large job is not starved by a stream of small
  ones. It waits at most for the jobs already on that worker to end (bounded
  by their start-to-close timeouts) after it reached the front.

Every reason a job cannot run is reported once, when it changes
(:class:`Block`), so the scheduler can record it as ``TaskBlocked``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pantheon_es.specs import Resources

Key = tuple[str, str]  # (tenant, id)
EPS = 1e-9
_NO_CUSTOM: dict[str, float] = {}


class BlockReason(StrEnum):
    """Why a pending job cannot be placed now (the values are the wire names)."""

    QUOTA = "quota"
    AGENT_LIMIT = "agent_limit"
    CONCURRENCY_KEY_FULL = "concurrency_key_full"
    NO_WORKER_FITS = "no_worker_fits"
    WAITING_FOR_CAPACITY = "waiting_for_capacity"


@dataclass(frozen=True)
class Quota:
    """A tenant's limits; ``None`` is unlimited."""

    max_running: int | None = None
    max_pending: int | None = None


@dataclass(frozen=True)
class Policy:
    """How the scheduler orders and limits work (``pantheon up`` options set it)."""

    aging_per_s: float = 1.0
    band: int = 100
    #: Plain first come, first served: no priorities, aging or fair share (for what-if runs).
    fifo: bool = False
    tenant_weights: Mapping[str, float] = field(default_factory=dict)
    fairness_weights: Mapping[str, float] = field(default_factory=dict)
    max_running_agents: int | None = None
    concurrency_limits: Mapping[str, int] = field(default_factory=dict)
    default_quota: Quota = Quota()
    tenant_quotas: Mapping[str, Quota] = field(default_factory=dict)
    #: Jobs looked at past the first one that does not fit, per pass (bounds a pass's work).
    backfill_window: int = 256
    #: Workers held back for front jobs that do not fit yet.
    max_reservations: int = 1
    #: A request no registered worker could ever hold: refuse the submit (``unschedulable``)
    #: or accept it and block it until a big enough worker joins. With no worker
    #: registered at all, a task is always accepted.
    unschedulable: str = "reject"

    def __post_init__(self) -> None:
        if self.aging_per_s <= 0 or self.band <= 0:
            raise ValueError("aging_per_s and band must be positive")
        weights = [*self.tenant_weights.values(), *self.fairness_weights.values()]
        if any(w <= 0 for w in weights):
            raise ValueError("fair-share weights must be positive")
        if self.unschedulable not in ("reject", "block"):
            raise ValueError("unschedulable must be 'reject' or 'block'")
        limits = [*self.concurrency_limits.values(), self.max_running_agents]
        if any(n is not None and n < 1 for n in limits):
            raise ValueError("limits must be at least 1")

    def quota(self, tenant: str) -> Quota:
        return self.tenant_quotas.get(tenant, self.default_quota)

    def overtake_bound(self, priority: int, highest: int) -> float:
        """Seconds after which nothing newly ready overtakes a job of ``priority``."""
        if self.fifo:
            return 0.0
        return (max(highest - priority, 0) + self.band) / self.aging_per_s


class Amount:
    """A mutable resource vector (the pydantic model is too slow for the hot path)."""

    __slots__ = ("cpu", "custom", "gpu", "memory_mb")

    def __init__(
        self, cpu: float, memory_mb: float, gpu: float, custom: Mapping[str, float] | None = None
    ) -> None:
        self.cpu = cpu
        self.memory_mb = memory_mb
        self.gpu = gpu
        # Shared when empty: only copies (free capacity) are ever changed, and copy() copies.
        self.custom: dict[str, float] = dict(custom) if custom else _NO_CUSTOM

    @classmethod
    def of(cls, r: Resources | Any) -> Amount:
        return cls(r.cpu, r.memory_mb, r.gpu, r.custom)

    def copy(self) -> Amount:
        fresh = Amount(self.cpu, self.memory_mb, self.gpu)
        fresh.custom = dict(self.custom)
        return fresh

    def covers(self, need: Amount) -> bool:
        if need.cpu > self.cpu + EPS or need.memory_mb > self.memory_mb + EPS:
            return False
        if need.gpu > self.gpu + EPS:
            return False
        custom = self.custom
        return all(custom.get(k, 0.0) + EPS >= v for k, v in need.custom.items() if v > 0)

    def add(self, other: Amount, sign: int) -> None:
        self.cpu += sign * other.cpu
        self.memory_mb += sign * other.memory_mb
        self.gpu += sign * other.gpu
        for k, v in other.custom.items():
            self.custom[k] = self.custom.get(k, 0.0) + sign * v

    def as_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "memory_mb": self.memory_mb, "gpu": self.gpu,
                "custom": dict(self.custom)}  # fmt: skip


@dataclass(eq=False, slots=True)
class Job:
    """A pending task as the policy sees it."""

    key: Key
    priority: int
    #: When it became ready (submitted, retry due, lease lost), on the caller's clock.
    since: float
    need: Amount
    agent: bool = False
    fairness_key: str = ""
    concurrency_key: str | None = None
    concurrency_limit: int | None = None
    # -- kept by Placement --
    rank: tuple[float, int] = (0.0, 0)
    version: int = 0  # bumped on every (re)queue: older heap entries are stale
    where: str = ""  # "ready", "parked", "" (not pending)
    parked_on: tuple[str, str] | None = None
    reason: str | None = None  # the last reason reported for it
    reserved: Key | None = None  # the worker it holds back

    @property
    def tenant(self) -> str:
        return self.key[0]

    def effective(self, now: float, aging: float) -> float:
        return self.priority + aging * max(0.0, now - self.since)


def serves(tenants: Collection[str], tenant: str) -> bool:
    """Whether a worker registered with ``tenants`` takes ``tenant``'s work ("*": all)."""
    return tenant in tenants or "*" in tenants


@dataclass(eq=False, slots=True)
class Slot:
    """A worker as the policy sees it."""

    key: Key
    capacity: Amount
    slots: int
    free: Amount
    free_slots: int
    #: Tenants whose work it takes (its own by default); "*" = every tenant.
    tenants: frozenset[str]
    accepting: bool = True
    reserved_for: Key | None = None
    jobs: set[Key] = field(default_factory=set)

    def serves(self, tenant: str) -> bool:
        return tenant in self.tenants or "*" in self.tenants  # serves(), inline: a hot loop


@dataclass(frozen=True, slots=True)
class Grant:
    key: Key
    worker: Key


@dataclass(frozen=True, slots=True)
class Block:
    key: Key
    reason: BlockReason
    details: dict[str, Any]


@dataclass(slots=True)
class Outcome:
    grants: list[Grant] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)


@dataclass(slots=True)
class _Running:
    job: Job
    worker: Key


class _Group:
    """One fairness group's ready jobs: a heap of (rank, version, job)."""

    __slots__ = ("count", "heap", "vt")

    def __init__(self, vt: float) -> None:
        self.heap: list[tuple[float, int, int, Job]] = []
        self.count = 0
        self.vt = vt

    def head(self) -> Job | None:
        heap = self.heap
        while heap:
            _r0, _r1, version, job = heap[0]
            if job.where == "ready" and job.version == version:
                return job
            heapq.heappop(heap)
        return None


class _Tenant:
    __slots__ = ("count", "groups", "vt")

    def __init__(self, vt: float) -> None:
        self.groups: dict[str, _Group] = {}
        self.count = 0
        self.vt = vt


class Placement:
    """The live set of pending jobs, running jobs and workers, and the placement rules."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self.jobs: dict[Key, Job] = {}  # pending: ready or parked
        self.running: dict[Key, _Running] = {}
        self.workers: dict[Key, Slot] = {}
        self._tenants: dict[str, _Tenant] = {}
        self._parked: dict[tuple[str, str], list[tuple[float, int, int, Job]]] = {}
        self._seq = itertools.count()
        self._running_by_tenant: dict[str, int] = {}
        self._running_by_ckey: dict[str, int] = {}
        self._running_agents = 0
        self._pending_by_tenant: dict[str, int] = {}
        self._open_slots = 0  # free slots of accepting workers
        self._reservations = 0

    # -- questions --
    def pending_count(self, tenant: str) -> int:
        return self._pending_by_tenant.get(tenant, 0)

    def running_count(self, tenant: str) -> int:
        return self._running_by_tenant.get(tenant, 0)

    def ready_count(self) -> int:
        return sum(t.count for t in self._tenants.values())

    def why(self, key: Key, now: float) -> dict[str, Any]:
        """What the policy knows about one job: where it waits and why."""
        aging = 0.0 if self.policy.fifo else self.policy.aging_per_s
        if key in self.running:
            return {"state": "placed", "worker_id": self.running[key].worker[1]}
        job = self.jobs.get(key)
        if job is None:
            return {"state": "unknown"}
        out: dict[str, Any] = {
            "state": job.where,
            "priority": job.priority,
            "effective_priority": round(job.effective(now, aging), 3),
            "reason": job.reason,
        }
        if job.where == "parked" and job.parked_on is not None:
            out["parked_on"] = {"limit": job.parked_on[0], "name": job.parked_on[1]}
        if job.where == "ready":
            tq = self._tenants.get(job.tenant)
            group = tq.groups.get(job.fairness_key) if tq else None
            if group is not None:
                out["ahead_in_group"] = sum(
                    1
                    for _r0, _r1, v, other in group.heap
                    if other.where == "ready" and other.version == v and other.rank < job.rank
                )
        if job.reserved is not None:
            out["reserved_worker"] = job.reserved[1]
        return out

    # -- workers --
    def add_worker(
        self,
        key: Key,
        capacity: Resources | Any,
        slots: int,
        *,
        tenants: Iterable[str] | None = None,
        accepting: bool = True,
    ) -> None:
        """A worker joins (or re-registers: what it runs is kept)."""
        old = self.workers.pop(key, None)
        cap = Amount.of(capacity)
        slot = Slot(key, cap, slots, cap.copy(), slots,
                    frozenset(tenants) if tenants else frozenset({key[0]}), accepting)  # fmt: skip
        if old is not None:
            self._close(old)
            self._unreserve(old)
            for job_key in old.jobs:
                run = self.running.get(job_key)
                if run is not None:
                    slot.free.add(run.job.need, -1)
                    slot.free_slots -= 1
                    slot.jobs.add(job_key)
        self.workers[key] = slot
        self._open(slot)
        self._unpark_all("nofit")

    def set_accepting(self, key: Key, accepting: bool) -> None:
        slot = self.workers.get(key)
        if slot is None or slot.accepting == accepting:
            return
        self._close(slot)
        self._unreserve(slot)
        slot.accepting = accepting
        self._open(slot)
        if accepting:
            self._unpark_all("nofit")

    def remove_worker(self, key: Key) -> list[Key]:
        """A worker left; returns the jobs still placed on it (their leases must end)."""
        slot = self.workers.pop(key, None)
        if slot is None:
            return []
        self._close(slot)
        self._unreserve(slot)
        return sorted(slot.jobs)

    def _open(self, slot: Slot) -> None:
        """Count the slot's free slots as open (after a change to it)."""
        if slot.accepting:
            self._open_slots += max(slot.free_slots, 0)

    def _close(self, slot: Slot) -> None:
        """Stop counting the slot's free slots (before a change to it)."""
        if slot.accepting:
            self._open_slots -= max(slot.free_slots, 0)

    def _unreserve(self, slot: Slot) -> None:
        if slot.reserved_for is not None:
            job = self.jobs.get(slot.reserved_for)
            if job is not None:
                job.reserved = None
            slot.reserved_for = None
            self._reservations -= 1

    # -- jobs --
    def add(self, job: Job) -> None:
        """A job became pending (submitted, lease lost, retry due)."""
        if job.key in self.jobs or job.key in self.running:
            self.remove(job.key)
        job.rank = (
            (job.since, next(self._seq))
            if self.policy.fifo
            else (self.policy.aging_per_s * job.since - job.priority, next(self._seq))
        )
        job.reason = None
        self.jobs[job.key] = job
        self._pending_by_tenant[job.tenant] = self._pending_by_tenant.get(job.tenant, 0) + 1
        self._ready(job)

    def remove(self, key: Key) -> Job | None:
        """A job left the pending set without us (cancelled, leased by another decision)."""
        job = self.jobs.pop(key, None)
        if job is not None:
            self._pending_by_tenant[job.tenant] -= 1
            if not self._pending_by_tenant[job.tenant]:
                del self._pending_by_tenant[job.tenant]
            self._unready(job)
            self._drop_reservation(job)
            job.where = ""
            return job
        self.release(key)
        return None

    def assign(self, job: Job, worker: Key) -> None:
        """A job is placed on ``worker`` by a decision we did not make here (start-up)."""
        if job.key in self.jobs:
            self.remove(job.key)
        self._run(job, worker)

    def release(self, key: Key) -> None:
        """A placed job's lease ended (finished, expired, released): free what it held."""
        run = self.running.pop(key, None)
        if run is None:
            return
        job = run.job
        slot = self.workers.get(run.worker)
        if slot is not None and key in slot.jobs:
            self._close(slot)
            slot.jobs.discard(key)
            slot.free.add(job.need, +1)
            slot.free_slots += 1
            self._open(slot)
        tenant = job.tenant
        self._running_by_tenant[tenant] -= 1
        if not self._running_by_tenant[tenant]:
            del self._running_by_tenant[tenant]
        quota = self.policy.quota(tenant).max_running
        if quota is not None:
            self._unpark(("quota", tenant), quota - self.running_count(tenant))
        if job.agent:
            self._running_agents -= 1
            limit = self.policy.max_running_agents
            if limit is not None:
                self._unpark(("agents", ""), limit - self._running_agents)
        if job.concurrency_key is not None:
            ck = job.concurrency_key
            self._running_by_ckey[ck] -= 1
            left = self._running_by_ckey[ck]
            if not left:
                del self._running_by_ckey[ck]
            limit = self._ckey_limit(job)
            if limit is not None:
                self._unpark(("ckey", ck), limit - left)

    def _run(self, job: Job, worker: Key) -> None:
        self.running[job.key] = _Running(job, worker)
        slot = self.workers.get(worker)
        if slot is not None:
            self._close(slot)
            slot.jobs.add(job.key)
            slot.free.add(job.need, -1)
            slot.free_slots -= 1
            self._open(slot)
        tenant = job.tenant
        self._running_by_tenant[tenant] = self._running_by_tenant.get(tenant, 0) + 1
        if job.agent:
            self._running_agents += 1
        if job.concurrency_key is not None:
            ck = job.concurrency_key
            self._running_by_ckey[ck] = self._running_by_ckey.get(ck, 0) + 1

    def _ckey_limit(self, job: Job) -> int | None:
        if job.concurrency_limit is not None:
            return job.concurrency_limit
        if job.concurrency_key is None:
            return None
        return self.policy.concurrency_limits.get(job.concurrency_key)

    # -- ready queues --
    def _min_vt(self, values: Iterable[float]) -> float:
        return min(values, default=0.0)

    def _ready(self, job: Job) -> None:
        tq = self._tenants.get(job.tenant)
        if tq is None:
            tq = self._tenants[job.tenant] = _Tenant(
                self._min_vt(t.vt for t in self._tenants.values())
            )
        group = tq.groups.get(job.fairness_key)
        if group is None:
            group = tq.groups[job.fairness_key] = _Group(
                self._min_vt(g.vt for g in tq.groups.values())
            )
        job.version += 1
        job.where = "ready"
        job.parked_on = None
        heapq.heappush(group.heap, (job.rank[0], job.rank[1], job.version, job))
        group.count += 1
        tq.count += 1

    def _unready(self, job: Job) -> None:
        """Take a job out of its ready heap or its parking list (entries go stale)."""
        if job.where == "ready":
            tq = self._tenants[job.tenant]
            group = tq.groups[job.fairness_key]
            group.count -= 1
            tq.count -= 1
            if not group.count:
                del tq.groups[job.fairness_key]
            if not tq.count:
                del self._tenants[job.tenant]
        job.version += 1
        job.where = ""
        job.parked_on = None

    def _park(self, job: Job, on: tuple[str, str]) -> None:
        self._unready(job)
        self._drop_reservation(job)  # a parked job must not hold a worker back
        job.where = "parked"
        job.parked_on = on
        heapq.heappush(
            self._parked.setdefault(on, []), (job.rank[0], job.rank[1], job.version, job)
        )

    def _unpark(self, on: tuple[str, str], count: int) -> None:
        heap = self._parked.get(on)
        while heap and count > 0:
            _r0, _r1, version, job = heapq.heappop(heap)
            if job.where == "parked" and job.version == version:
                self._ready(job)
                count -= 1
        if heap is not None and not heap:
            del self._parked[on]

    def _unpark_all(self, kind: str) -> None:
        for on in [on for on in self._parked if on[0] == kind]:
            self._unpark(on, len(self._parked[on]))

    def _drop_reservation(self, job: Job) -> None:
        if job.reserved is not None:
            slot = self.workers.get(job.reserved)
            if slot is not None and slot.reserved_for == job.key:
                slot.reserved_for = None
                self._reservations -= 1
            job.reserved = None

    def _pick(self, now: float) -> Job | None:
        """The best ready job: highest band, then fair share, then rank."""
        best: tuple[Any, ...] | None = None
        best_group: _Group | None = None
        fifo = self.policy.fifo
        aging, band = self.policy.aging_per_s, self.policy.band
        for tq in self._tenants.values():
            for group in tq.groups.values():
                head = group.head()
                if head is None:
                    continue
                if fifo:
                    cand: tuple[Any, ...] = (head.rank,)
                else:
                    b = int(head.effective(now, aging) // band)
                    cand = (-b, tq.vt, group.vt, head.rank)
                if best is None or cand < best:
                    best, best_group = cand, group
        if best_group is None:
            return None
        _r0, _r1, _v, job = heapq.heappop(best_group.heap)
        return job

    # -- placing --
    def _limit(self, job: Job) -> tuple[BlockReason, tuple[str, str], dict[str, Any]] | None:
        tenant = job.tenant
        quota = self.policy.quota(tenant).max_running
        if quota is not None and self.running_count(tenant) >= quota:
            return (BlockReason.QUOTA, ("quota", tenant), {"tenant": tenant, "max_running": quota})
        limit = self.policy.max_running_agents
        if job.agent and limit is not None and self._running_agents >= limit:
            return (BlockReason.AGENT_LIMIT, ("agents", ""), {"max_running_agents": limit})
        ck = job.concurrency_key
        if ck is not None:
            climit = self._ckey_limit(job)
            if climit is not None and self._running_by_ckey.get(ck, 0) >= climit:
                return (
                    BlockReason.CONCURRENCY_KEY_FULL,
                    ("ckey", ck),
                    {"concurrency_key": ck, "limit": climit},
                )
        return None

    def _fit(self, job: Job, now: float) -> Slot | None:
        """Best fit among accepting workers with room, respecting reservations."""
        best: Slot | None = None
        best_left = 0.0
        aging = 0.0 if self.policy.fifo else self.policy.aging_per_s
        need = job.need
        for slot in self.workers.values():
            if not slot.accepting or slot.free_slots < 1 or not slot.serves(job.tenant):
                continue
            holder = slot.reserved_for
            if holder is not None and holder != job.key:
                other = self.jobs.get(holder)
                if other is not None and (other.effective(now, aging), -other.rank[1]) >= (
                    job.effective(now, aging),
                    -job.rank[1],
                ):
                    continue  # held for a job ranked above this one
            if not slot.free.covers(need):
                continue
            left = _spare(slot, need)
            if best is None or left < best_left:
                best, best_left = slot, left
        return best

    def _could_ever_fit(self, job: Job) -> bool:
        return any(
            s.accepting and s.serves(job.tenant) and s.capacity.covers(job.need)
            for s in self.workers.values()
        )

    def impossible(self, tenant: str, need: Amount) -> dict[str, Any] | None:
        """Why no registered worker could ever hold ``need`` (None if one could, or if no
        worker serving the tenant is registered: one may still join)."""
        serving = []
        for slot in self.workers.values():
            if slot.serves(tenant):
                if slot.capacity.covers(need):
                    return None
                serving.append(slot)
        if not serving:
            return None
        return {
            "request": need.as_dict(),
            "largest_worker": max(
                (s.capacity.as_dict() for s in serving),
                key=lambda c: (c["cpu"], c["memory_mb"], c["gpu"]),
            ),
            "workers": len(serving),
        }

    def _reserve(self, job: Job, out: Outcome) -> None:
        if job.reserved is not None or self._reservations >= self.policy.max_reservations:
            return
        best: Slot | None = None
        best_gap = 0.0
        for slot in self.workers.values():
            if (
                slot.accepting
                and slot.reserved_for is None
                and slot.serves(job.tenant)
                and slot.capacity.covers(job.need)
            ):
                gap = _shortfall(slot, job.need)
                if best is None or gap < best_gap:
                    best, best_gap = slot, gap
        if best is None:
            return
        best.reserved_for = job.key
        job.reserved = best.key
        self._reservations += 1
        self._tell(job, BlockReason.WAITING_FOR_CAPACITY, {"reserved_worker": best.key[1]}, out)

    def _tell(self, job: Job, reason: BlockReason, details: dict[str, Any], out: Outcome) -> None:
        if job.reason != reason.value:
            job.reason = reason.value
            out.blocks.append(Block(job.key, reason, details))

    def place(self, now: float) -> Outcome:
        """Place what can be placed now; the grants are already accounted as running."""
        out = Outcome()
        if self._open_slots <= 0 or not self._tenants:
            return out
        aside: list[Job] = []
        misses = 0
        window = self.policy.backfill_window
        while self._open_slots > 0:
            job = self._pick(now)
            if job is None:
                break
            limit = self._limit(job)
            if limit is not None:
                reason, on, details = limit
                self._park(job, on)
                self._tell(job, reason, details, out)
                continue
            slot = self._fit(job, now)
            if slot is not None:
                self._drop_reservation(job)
                self.jobs.pop(job.key)
                self._pending_by_tenant[job.tenant] -= 1
                if not self._pending_by_tenant[job.tenant]:
                    del self._pending_by_tenant[job.tenant]
                self._unready(job)
                self._run(job, slot.key)
                out.grants.append(Grant(job.key, slot.key))
                tq = self._tenants.get(job.tenant)
                w = self.policy.tenant_weights.get(job.tenant, 1.0)
                if tq is not None:
                    tq.vt += 1.0 / w
                    group = tq.groups.get(job.fairness_key)
                    if group is not None:
                        group.vt += 1.0 / self.policy.fairness_weights.get(job.fairness_key, 1.0)
                continue
            if not self._could_ever_fit(job):
                self._park(job, ("nofit", job.tenant))
                self._tell(job, BlockReason.NO_WORKER_FITS, {"request": job.need.as_dict(),
                           "workers": len(self.workers)}, out)  # fmt: skip
                continue
            self._reserve(job, out)
            aside.append(job)
            misses += 1
            if misses > window:
                break
        for job in aside:  # back into its heap, same rank
            tq = self._tenants[job.tenant]
            group = tq.groups[job.fairness_key]
            heapq.heappush(group.heap, (job.rank[0], job.rank[1], job.version, job))
        return out


def _spare(slot: Slot, need: Amount) -> float:
    """Capacity a worker would have left, as a sum of fractions (smaller = tighter fit)."""
    cap, free = slot.capacity, slot.free
    left = (slot.free_slots - 1) / slot.slots if slot.slots else 0.0
    if cap.cpu > 0:
        left += (free.cpu - need.cpu) / cap.cpu
    if cap.memory_mb > 0:
        left += (free.memory_mb - need.memory_mb) / cap.memory_mb
    if cap.gpu > 0:
        left += (free.gpu - need.gpu) / cap.gpu
    return left


def _shortfall(slot: Slot, need: Amount) -> float:
    """How far a worker's free capacity is from holding ``need`` (0 = it fits)."""
    cap, free = slot.capacity, slot.free
    gap = 0.0 if slot.free_slots >= 1 else 1.0
    for want, have, total in (
        (need.cpu, free.cpu, cap.cpu),
        (need.memory_mb, free.memory_mb, cap.memory_mb),
        (need.gpu, free.gpu, cap.gpu),
    ):
        if want > have and total > 0:
            gap += (want - have) / total
    for k, v in need.custom.items():
        have = free.custom.get(k, 0.0)
        total = cap.custom.get(k, 0.0)
        if v > have and total > 0:
            gap += (v - have) / total
    return gap
