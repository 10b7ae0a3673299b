"""The what-if simulator, pure: the log folded into a workload, and the workload run through
the placement policy in simulated time (no server)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pantheon_es.events import EventRecord
from pantheon_es.placement import Policy, Quota
from pantheon_es.workflows import FAIL_FAST_REASON
from tools.whatif import (
    Attempt,
    PolicyFile,
    PolicyFileError,
    TaskRecord,
    WorkerChange,
    Workload,
    WorkloadBuilder,
    compare,
    load_policy,
    measure,
    parse_policy,
    percentile,
    recorded,
    simulate,
)

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_800_000_000.0  # an epoch second: the log's times are ISO strings from it


def iso(t: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(T0 + t, UTC).isoformat()


_seq = itertools.count(1)


def rec(t: float, type_: str, agg_id: str, data: dict[str, Any], *, tenant: str = "a",
        aggregate: str = "task") -> EventRecord:  # fmt: skip
    seq = next(_seq)
    return EventRecord(seq, f"e{seq}", type_, 1, tenant, aggregate, agg_id, iso(t), "test",
                       "c", None, data)  # fmt: skip


def submitted(t: float, task: str, priority: int = 200, cpu: float = 1.0, **kw: Any) -> EventRecord:
    data = {"name": task.rstrip("0123456789"), "priority": priority,
            "resources": {"cpu": cpu, "memory_mb": 0, "gpu": 0, "custom": {}},
            "executor": {"kind": "python"}, "labels": {}, **kw}  # fmt: skip
    return rec(t, "TaskSubmitted", task, data)


def granted(t: float, task: str, worker: str = "w") -> EventRecord:
    return rec(t, "LeaseGranted", task, {"lease_id": f"l{t}", "worker_id": worker})


def registered(t: float, worker: str, cpu: float = 4.0, slots: int = 4, inc: str = "i1",
               tenants: list[str] | None = None) -> EventRecord:  # fmt: skip
    data = {"incarnation": inc, "capacity": {"cpu": cpu, "memory_mb": 1024, "gpu": 0,
            "custom": {}}, "slots": slots, "tenants": tenants or []}  # fmt: skip
    return rec(t, "WorkerRegistered", worker, data, aggregate="worker")


def fold(records: list[EventRecord]) -> Workload:
    b = WorkloadBuilder()
    for r in records:
        b.add(r)
    return b.finish()


# -- the log folded ------------------------------------------------------------------------------


def test_builder_records_attempts_retry_gaps_waits_and_what_never_ran() -> None:
    w = fold([
        registered(0, "w", cpu=2, slots=2),
        submitted(1, "job1"),
        granted(3, "job1"),
        rec(5, "RetryScheduled", "job1", {"not_before": iso(9), "attempt": 1}),
        granted(9.5, "job1"),
        rec(12.5, "TaskCompleted", "job1", {}),
        submitted(2, "job2"),
        rec(4, "TaskCancelled", "job2", {"previous_status": "pending"}),
        submitted(6, "job3"),
        granted(6, "job3"),
        rec(7, "LeaseExpired", "job3", {}),
        granted(8, "job3"),
        submitted(13, "late1"),
        rec(20, "WorkerStopped", "w", {"incarnation": "i1"}, aggregate="worker"),
    ])  # fmt: skip
    j1, j2, j3, late = (w.tasks[("a", k)] for k in ("job1", "job2", "job3", "late1"))
    assert [(a.start, a.duration, a.gap) for a in j1.attempts] == [(3.0, 2.0, 4.0), (9.5, 3.0, 0.0)]
    assert j1.outcome == "completed" and j1.first_grant == 3.0 and not j1.estimated
    # cancelled while pending: withdrawn, with an estimated run should a policy start it
    assert j2.withdrawn == 4.0 and j2.estimated and j2.first_grant is None
    # the job3 attempt that lost its lease, then one still running at the cut-off (t=20)
    assert [(a.duration, a.censored) for a in j3.attempts] == [(1.0, False), (12.0, True)]
    # never ran: the median observed duration of its name ("late"), else of every attempt
    assert late.estimated and late.attempts[0].duration == 2.0  # median of 2, 3 and 1
    assert j2.attempts[0].duration == 2.0
    assert [(c.kind, c.at) for c in w.workers] == [("join", 0.0), ("leave", 20.0)]
    assert w.workers[0].tenants == ("a",)
    waits = recorded(w)
    assert waits.first_start == {("a", "job1"): 3.0, ("a", "job3"): 6.0}


def test_a_stale_incarnation_does_not_end_the_new_one() -> None:
    w = fold([
        registered(0, "w", inc="one"),
        registered(1, "w", inc="two"),
        rec(2, "WorkerLost", "w", {"incarnation": "one"}, aggregate="worker"),
    ])  # fmt: skip
    assert [c.kind for c in w.workers] == ["join", "join"]


# -- the simulation -------------------------------------------------------------------------------


def task(name: str, at: float, *durations: float, priority: int = 200, cpu: float = 1.0,
         tenant: str = "a", gaps: tuple[float, ...] = (), **kw: Any) -> TaskRecord:  # fmt: skip
    attempts = [Attempt(None, d, gap=gaps[i] if i < len(gaps) else 0.0)
                for i, d in enumerate(durations)]  # fmt: skip
    return TaskRecord((tenant, name), name, priority, {"cpu": cpu}, False, at,
                      attempts=attempts, **kw)  # fmt: skip


def join(at: float, name: str, cpu: float = 4.0, slots: int = 4, inc: str = "1") -> WorkerChange:
    return WorkerChange(at, "join", ("a", name), {"cpu": cpu}, slots, ("*",), inc)


def workload(tasks: list[TaskRecord], workers: list[WorkerChange]) -> Workload:
    return Workload(None, 0.0, 0, 0, {t.key: t for t in tasks}, workers)


def test_fifo_runs_in_arrival_order_and_priority_lets_urgent_work_overtake() -> None:
    tasks = [task(f"low{i}", i * 0.01, 1.0, priority=100) for i in range(6)]
    tasks += [task("urgent0", 0.5, 1.0, priority=400)]
    w = workload(tasks, [join(0, "w", cpu=1, slots=1)])
    fifo = simulate(w, Policy(fifo=True))
    prio = simulate(w, Policy())
    u = ("a", "urgent0")
    assert fifo.first_start[u] == 6.0  # after all six low ones
    assert prio.first_start[u] == 1.0  # at the first free slot
    rep = measure(w, prio)
    assert rep["wait"]["by_priority"]["urgent"]["max"] == 0.5
    assert rep["makespan"] == fifo.end == prio.end == 7.0
    assert rep["utilisation"]["cpu"] == 1.0


def test_retries_wait_their_recorded_gap_and_dependents_wait_for_their_dependency() -> None:
    a = task("a", 0, 2.0, 1.0, gaps=(5.0,))
    b = task("b", 0, 1.0, depends_on=("a",))
    skipped = task("s", 0, depends_on=("a",), outcome="skipped")
    w = workload([a, b, skipped], [join(0, "w")])
    out = simulate(w, Policy())
    runs = sorted((r.key[1], r.attempt, r.start, r.end) for r in out.runs)
    assert runs == [("a", 0, 0.0, 2.0), ("a", 1, 7.0, 8.0), ("b", 0, 8.0, 9.0)]
    assert out.ready[("a", "b")] == 8.0 and ("a", "s") not in out.first_start
    assert measure(w, out)["not_started"] == 0  # the skipped task is not "never started"


def test_a_worker_that_leaves_loses_its_attempt_which_runs_again_in_full() -> None:
    w = workload(
        [task("j", 0, 10.0)],
        [join(0, "w1", slots=1), WorkerChange(4, "leave", ("a", "w1")), join(6, "w2")],
    )
    out = simulate(w, Policy())
    assert [(r.worker[1], r.start, r.end) for r in out.runs] == [("w1", 0, 4), ("w2", 6, 16)]


def test_a_task_cancelled_while_pending_is_withdrawn_unless_the_policy_started_it() -> None:
    hog = task("hog", 0, 10.0)
    cancelled = task("c", 1, 3.0, withdrawn=5.0, outcome="cancelled")
    w = workload([hog, cancelled], [join(0, "w", slots=1)])
    assert ("a", "c") not in simulate(w, Policy()).first_start
    w2 = workload([hog, cancelled], [join(0, "w", slots=2)])
    assert simulate(w2, Policy()).first_start[("a", "c")] == 1


def test_no_worker_means_nothing_starts_and_the_report_still_stands() -> None:
    w = workload([task("j", 0, 1.0)], [])
    report = compare(w, PolicyFile())
    assert report["simulated"]["not_started"] == 1 and report["simulated"]["started"] == 0
    assert report["simulated"]["wait"]["all"]["p50"] is None
    empty = compare(workload([], []), PolicyFile(mode="fifo"))
    assert empty["simulated"]["makespan"] == 0 and empty["tasks"]["total"] == 0


def test_a_schedule_to_start_timeout_fires_anew_and_skips_its_dependents() -> None:
    hog = task("hog", 0, 10.0)
    waiter = task("waiter", 1, 1.0, schedule_to_start=2.0, workflow_id="wf")
    after = task("after", 1, 1.0, depends_on=("waiter",), workflow_id="wf")
    w = workload([hog, waiter, after], [join(0, "w", slots=1)])
    out = simulate(w, Policy())
    # one slot, held by the hog until 10: the waiter times out at 1 + 2, its dependent skips
    assert out.timed_out == {("a", "waiter")} and out.finished[("a", "waiter")] == 3.0
    assert {("a", "waiter"), ("a", "after")} <= out.gone
    assert set(out.first_start) == {("a", "hog")}
    report = measure(w, out)
    assert report["timed_out_before_start"] == 1 and report["not_started"] == 0
    # with a second slot it starts at once and its dependent runs after it
    roomy = simulate(workload([hog, waiter, after], [join(0, "w", slots=2)]), Policy())
    assert not roomy.timed_out and roomy.first_start[("a", "after")] == 2.0


def test_a_task_that_timed_out_waiting_in_the_recording_may_start_under_another_policy() -> None:
    w = fold([
        registered(0, "w", cpu=1, slots=1),
        submitted(0, "hog1", priority=100),
        granted(0, "hog1"),
        submitted(1, "urgent1", priority=400, schedule_to_start_timeout=3.0, workflow_id="f"),
        submitted(1, "next1", priority=400, depends_on=["urgent1"], workflow_id="f"),
        rec(4, "TaskTimedOut", "urgent1", {"kind": "schedule_to_start", "timeout": 3.0}),
        rec(4, "TaskSkipped", "next1", {}),
        rec(6, "TaskCompleted", "hog1", {}),
        submitted(7, "hog2", priority=100),
        granted(7, "hog2"),
        rec(13, "TaskCompleted", "hog2", {}),
    ])  # fmt: skip
    urgent = w.tasks[("a", "urgent1")]
    assert urgent.start_timed_out and urgent.withdrawn is None and urgent.estimated
    assert w.estimate("next") == w.median == 6.0  # no "next" ever ran: every attempt's median
    rec_out = recorded(w)
    assert rec_out.timed_out == {("a", "urgent1")} and ("a", "next1") in rec_out.gone
    assert measure(w, rec_out)["timed_out_before_start"] == 1
    assert measure(w, rec_out)["refused"] is None  # the log holds only accepted submits
    # the recorded policy is replayed: the hog holds the only slot, the timeout fires again
    again = simulate(w, Policy())
    assert again.timed_out == {("a", "urgent1")} and ("a", "next1") not in again.first_start
    # one more slot: the urgent task starts in time, and its dependent, skipped in the
    # recording because of that timeout, runs for an estimated time
    roomier = replace(w, workers=[replace(w.workers[0], slots=2, capacity={"cpu": 2})])
    out = simulate(roomier, Policy())
    assert not out.timed_out and out.first_start[("a", "urgent1")] == 1.0
    assert out.first_start[("a", "next1")] == 7.0  # after urgent1's estimated 6 s


def test_the_pending_bound_refuses_submits_and_a_workflow_whole() -> None:
    singles = [task(f"s{i}", 0, 5.0) for i in range(4)]
    flow = [task(f"f{i}", 1, 1.0, workflow_id="wf") for i in range(3)]
    w = workload([*singles, *flow], [join(0, "w", slots=1)])
    out = simulate(w, PolicyFile(max_pending_per_tenant=3).to_policy())
    # four arrive together: three are pending (bound 3), the fourth is refused; at t=1 one
    # runs and two wait, so a workflow of three would make five: refused whole
    assert out.refused == {("a", "s3"): "overloaded", **{f.key: "overloaded" for f in flow}}
    report = measure(w, out)
    assert report["refused"] == {"overloaded": 4, "unschedulable": 0}
    assert report["started"] == 3 and report["not_started"] == 0
    assert not simulate(w, PolicyFile(max_pending_per_tenant=None).to_policy()).refused
    per_tenant = PolicyFile(max_pending_per_tenant=None, tenant_max_pending={"a": 5})
    assert set(simulate(w, per_tenant.to_policy()).refused) == {f.key for f in flow}


def test_an_impossible_request_is_refused_or_blocks_as_the_policy_says() -> None:
    big = task("big", 1, 1.0, cpu=8.0)
    w = workload([big], [join(0, "w", cpu=4.0)])
    assert simulate(w, PolicyFile().to_policy()).refused == {big.key: "unschedulable"}
    blocked = simulate(w, PolicyFile(unschedulable="block").to_policy())
    assert not blocked.refused and big.key not in blocked.first_start
    assert measure(w, blocked)["not_started"] == 1
    # no worker registered yet: accepted (one may join), as the live scheduler does
    late = workload([big], [join(5, "w", cpu=8.0)])
    assert simulate(late, PolicyFile().to_policy()).first_start[big.key] == 5.0


def test_policy_quotas_merge_running_and_pending_limits() -> None:
    policy = PolicyFile(
        max_running_per_tenant=5, tenant_max_running={"a": 2}, tenant_max_pending={"b": 7}
    ).to_policy()
    assert policy.quota("a") == Quota(2, 100_000) and policy.quota("b") == Quota(5, 7)
    assert policy.quota("c") == Quota(5, 100_000)


def test_a_fail_fast_workflow_cancels_its_waiting_tasks_when_a_task_fails_there() -> None:
    w = fold([
        registered(0, "w", cpu=2, slots=2),
        rec(0, "WorkflowCreated", "wf", {"failure_policy": "fail_fast"}, aggregate="workflow"),
        submitted(0, "hog1", priority=400),
        granted(0, "hog1"),
        submitted(0, "x1", workflow_id="wf"),
        granted(0, "x1"),
        submitted(0, "y1", priority=100, workflow_id="wf"),
        rec(2, "TaskFailed", "x1", {}),
        rec(2, "TaskCancelled", "y1", {"reason": FAIL_FAST_REASON, "previous_status": "pending"}),
        rec(10, "TaskCompleted", "hog1", {}),
    ])  # fmt: skip
    x, y = w.tasks[("a", "x1")], w.tasks[("a", "y1")]
    assert x.outcome == "failed" and not x.stopped_by_workflow
    assert w.fail_fast == {("a", "wf")}
    assert y.stopped_by_workflow and y.withdrawn is None and y.estimated
    assert ("a", "y1") in recorded(w).gone
    # replayed: x fails at 2 and y, still waiting for a slot, is cancelled then
    out = simulate(w, Policy())
    assert ("a", "y1") in out.gone and out.finished[("a", "y1")] == 2.0
    assert ("a", "y1") not in out.first_start and measure(w, out)["not_started"] == 0
    # a third slot: y runs from the start, and x's failure stops it on its worker at 2
    roomy = replace(w, workers=[replace(w.workers[0], slots=3, capacity={"cpu": 3})])
    out = simulate(roomy, Policy())
    assert out.first_start[("a", "y1")] == 0.0 and ("a", "y1") not in out.gone
    assert out.finished[("a", "y1")] == 2.0 and ("a", "y1") in out.cancelled
    # a task of the workflow created after the failure is cancelled as it arrives
    late = task("z", 5, 1.0, workflow_id="wf")
    failing = task("x", 0, 1.0, outcome="failed", workflow_id="wf")
    w2 = replace(workload([failing, late], [join(0, "w")]), fail_fast={("a", "wf")})
    out = simulate(w2, Policy())
    assert late.key in out.gone and late.key not in out.first_start
    assert late.key in simulate(replace(w2, fail_fast=set()), Policy()).first_start


def test_a_fail_fast_failure_stops_a_running_task_and_its_worker_takes_the_next_at_once() -> None:
    long = task("long", 0, 100.0, workflow_id="wf")
    bad = task("bad", 0, 3.0, outcome="failed", workflow_id="wf")
    after = task("after", 0, 1.0, depends_on=("long",), workflow_id="wf")
    waiting = [task(f"next{i}", 1, 5.0) for i in range(2)]
    w = replace(
        workload([long, bad, after, *waiting], [join(0, "w", cpu=2, slots=2)]),
        fail_fast={("a", "wf")},
    )
    out = simulate(w, Policy())
    runs = sorted((r.key[1], r.start, r.end) for r in out.runs)
    # long is cancelled when bad fails at 3, not at 100: both slots take the waiting tasks then
    assert runs == [("bad", 0, 3), ("long", 0, 3), ("next0", 3, 8), ("next1", 3, 8)]
    assert out.cancelled == {long.key} and out.finished[long.key] == 3.0
    # cancelled, not completed: its dependent is skipped and never starts
    assert after.key in out.gone and after.key not in out.first_start
    rep = measure(w, out)
    assert rep["makespan"] == 8.0 and rep["utilisation"]["cpu"] == 1.0
    assert rep["started"] == 4 and rep["not_started"] == 0
    assert rep["wait"]["all"]["max"] == 2.0  # the waiting tasks, ready at 1, start at 3
    # without fail_fast the long task runs on, holding its slot, and its dependent runs
    out = simulate(replace(w, fail_fast=set()), Policy())
    runs = sorted((r.key[1], r.start, r.end) for r in out.runs)
    assert ("long", 0, 100) in runs and ("next1", 8, 13) in runs and not out.cancelled
    assert out.first_start[after.key] == 100.0


def test_a_recorded_fail_fast_stop_of_a_running_task_is_replayed_at_the_simulated_failure() -> None:
    w = fold([
        registered(0, "w", cpu=3, slots=3),
        rec(0, "WorkflowCreated", "wf", {"failure_policy": "fail_fast"}, aggregate="workflow"),
        submitted(0, "slow1", workflow_id="wf"),
        granted(0, "slow1"),
        submitted(0, "x1", workflow_id="wf"),
        granted(0, "x1"),
        submitted(0, "slow2"),
        granted(0, "slow2"),
        rec(2, "TaskFailed", "x1", {}),
        rec(2, "TaskCancelled", "slow1",
            {"reason": FAIL_FAST_REASON, "previous_status": "running"}),
        rec(10, "TaskCompleted", "slow2", {}),
    ])  # fmt: skip
    s1 = w.tasks[("a", "slow1")]
    assert s1.stopped_by_workflow and s1.outcome == "cancelled" and not s1.estimated
    assert [(a.duration, a.cut_short) for a in s1.attempts] == [(2.0, True)]
    assert w.medians["slow"] == 10.0  # a cut-short attempt is no observed length
    assert [(r.start, r.end) for r in recorded(w).runs if r.key == s1.key] == [(0.0, 2.0)]
    # replayed: x fails at 2 and slow1 is stopped then
    out = simulate(w, Policy())
    assert [(r.start, r.end) for r in out.runs if r.key == s1.key] == [(0.0, 2.0)]
    assert s1.key in out.cancelled and s1.key not in out.gone
    # if its workflow does not fail, it runs at least its name's median, and completes
    out = simulate(replace(w, fail_fast=set()), Policy())
    assert [(r.start, r.end) for r in out.runs if r.key == s1.key] == [(0.0, 10.0)]
    assert not out.cancelled and out.finished[s1.key] == 10.0


def test_nearest_rank_percentiles() -> None:
    values = [float(i) for i in range(1, 101)]
    assert [percentile(values, q) for q in (50, 90, 99, 100)] == [50.0, 90.0, 99.0, 100.0]
    assert percentile([3.0], 99) == 3.0


# -- properties ------------------------------------------------------------------------------------

sim_task = st.tuples(
    st.integers(0, 100).map(float),  # arrival
    st.sampled_from([100, 200, 300, 400]),
    st.sampled_from([0.5, 1.0, 2.0]),  # cpu
    st.lists(st.sampled_from([1.0, 3.0, 7.0]), min_size=1, max_size=3),  # attempt durations
    st.sampled_from(["a", "b"]),
)
sim_worker = st.tuples(
    st.integers(0, 50).map(float),  # join
    st.sampled_from([2.0, 4.0]),
    st.integers(1, 3),
    st.one_of(st.none(), st.integers(1, 80).map(float)),  # stays for
)


def build(tasks: list[Any], workers: list[Any], uniform: bool = False) -> Workload:
    trs = [task(f"t{i}", at, *durs, priority=prio, cpu=1.0 if uniform else cpu, tenant=tenant,
                gaps=(2.0,) * len(durs))
           for i, (at, prio, cpu, durs, tenant) in enumerate(tasks)]  # fmt: skip
    changes = []
    for i, (at, cpu, slots, stay) in enumerate(workers):
        changes.append(join(at, f"w{i}", cpu=cpu, slots=slots))
        if stay is not None and not uniform:
            changes.append(WorkerChange(at + stay, "leave", ("a", f"w{i}")))
    changes.append(join(60, "big", cpu=8, slots=4))  # everything can end
    return workload(trs, changes)


@settings(max_examples=120, deadline=None)
@given(
    tasks=st.lists(sim_task, min_size=1, max_size=40),
    workers=st.lists(sim_worker, max_size=4),
    fifo=st.booleans(),
)
def test_simulation_never_overcommits_and_runs_every_attempt_in_order(
    tasks: list[Any], workers: list[Any], fifo: bool
) -> None:
    w = build(tasks, workers)
    out = simulate(w, Policy(fifo=fifo, tenant_weights={"a": 2.0}))
    caps = {c.key: (float(c.capacity["cpu"]), c.slots) for c in w.workers if c.capacity}
    for worker, (cpu, slots) in caps.items():
        runs = [r for r in out.runs if r.worker == worker]
        for r in runs:  # at every start, what runs there fits the worker
            live = [x for x in runs if x.start <= r.start < x.end]
            need = sum(float(w.tasks[x.key].resources["cpu"]) for x in live)
            assert len(live) <= slots and need <= cpu + 1e-9, (worker, live)
    for key, t in w.tasks.items():
        mine = sorted((r for r in out.runs if r.key == key), key=lambda r: r.start)
        done = [r for r in mine if r.end - r.start >= t.attempts[r.attempt].duration - 1e-9]
        assert [r.attempt for r in done] == list(range(len(t.attempts)))  # each once, in order
        for prev, nxt in itertools.pairwise(done):
            assert nxt.start >= prev.end + t.attempts[prev.attempt].gap - 1e-9
        assert out.first_start[key] >= t.submitted


@settings(max_examples=120, deadline=None)
@given(tasks=st.lists(sim_task, min_size=2, max_size=40), workers=st.lists(sim_worker, max_size=3))
def test_fifo_starts_every_task_in_arrival_order(tasks: list[Any], workers: list[Any]) -> None:
    tasks = [(at, prio, cpu, durs[:1], tenant) for at, prio, cpu, durs, tenant in tasks]
    w = build(tasks, workers, uniform=True)  # one request size, workers that stay
    out = simulate(w, Policy(fifo=True))
    order = sorted(w.tasks.values(), key=lambda t: (t.submitted, t.key[1][1:].zfill(4)))
    starts = [out.first_start[t.key] for t in order]
    assert starts == sorted(starts)


busy_task = st.tuples(  # a backlog that outlasts the aging bound
    st.integers(0, 150).map(float),
    st.sampled_from([100, 200, 300, 400]),
    st.just(1.0),
    st.lists(st.sampled_from([5.0, 10.0, 20.0]), min_size=1, max_size=1),
    st.sampled_from(["a", "b"]),
)


@settings(max_examples=150, deadline=None)
@given(
    tasks=st.lists(busy_task, min_size=2, max_size=60),
    workers=st.lists(sim_worker, max_size=2),
    aging=st.sampled_from([5.0, 10.0, 20.0]),
)
def test_with_aging_no_task_is_overtaken_by_one_ready_later_than_the_bound(
    tasks: list[Any], workers: list[Any], aging: float
) -> None:
    tasks = [(at, prio, cpu, durs[:1], tenant) for at, prio, cpu, durs, tenant in tasks]
    w = build(tasks, workers, uniform=True)
    policy = Policy(aging_per_s=aging, tenant_weights={"a": 3.0})
    out = simulate(w, policy)
    highest = max(t.priority for t in w.tasks.values())
    for j, k in itertools.permutations(w.tasks.values(), 2):
        bound = policy.overtake_bound(j.priority, highest)
        if out.ready[k.key] > out.ready[j.key] + bound + 1e-6:
            assert out.first_start[k.key] >= out.first_start[j.key], (j, k, bound)


# -- the policy file -------------------------------------------------------------------------------


def test_example_policy_files_load() -> None:
    fifo = load_policy(ROOT / "examples" / "whatif-fifo.yaml")
    assert fifo.to_policy().fifo and fifo.label() == "fifo"
    aging = load_policy(ROOT / "examples" / "whatif-aging.yaml").to_policy()
    assert not aging.fifo and aging.aging_per_s == 2.0 and aging.concurrency_limits == {"db": 4}


@pytest.mark.parametrize(
    ("doc", "named"),
    [
        ({"mode": "lifo"}, "mode"),
        ({"aging": 1}, "aging"),
        ({"aging_per_s": 0}, "aging_per_s"),
        ({"tenant_weights": {"x": -1}}, "tenant_weights.x"),
        ({"tenant_max_running": {"x": 0}}, "tenant_max_running.x"),
        ([1, 2], "mapping"),
    ],
)
def test_a_bad_policy_names_the_field(doc: Any, named: str) -> None:
    with pytest.raises(PolicyFileError, match=named.replace(".", r"\.")):
        parse_policy(doc)


def test_policy_file_json_and_unreadable(tmp_path: Path) -> None:
    good = tmp_path / "p.json"
    good.write_text('{"mode": "fifo", "max_running_per_tenant": 3}')
    assert load_policy(good).to_policy().default_quota.max_running == 3
    bad = tmp_path / "p.yaml"
    bad.write_text("mode: [")
    with pytest.raises(PolicyFileError, match="not valid"):
        load_policy(bad)
