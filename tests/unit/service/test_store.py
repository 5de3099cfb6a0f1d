"""The request state machine on PostgreSQL: every action from every state, who may take it, the
record of each transition, the job each approval queues in the same transaction, cancelled jobs,
and requests of lost workers queued again (or failed after too many losses)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from imaging.errors import StoreError
from imaging.service import approvals
from imaging.service.store import RULES, SYSTEM, Actor, State, Store


@pytest.fixture
def store(database: str) -> Iterator[Store]:
    s = Store(database)
    yield s
    s.close()


FIELDS = dict(
    instance="i-1", name="demo", kind="export", vis=None, shared_with=[], disk_format="qcow2", target="kvm",
    options={},
)  # fmt: skip


def users(store: Store) -> tuple[Actor, Actor, Actor]:
    store.add_user("alice")
    store.add_user("bob")
    store.add_user("root", admin=True)
    found = {u.name: u for u in store.users()}
    return (Actor("alice", "user", found["alice"].id), Actor("bob", "user", found["bob"].id),
            Actor("root", "admin", found["root"].id))  # fmt: skip


WORKER = Actor("w1", "worker")


def in_state(store: Store, owner: Actor, admin: Actor, state: State) -> str:
    """A request driven to ``state`` through the allowed path."""
    rid = store.create(owner, **FIELDS).id
    path = {
        State.pending: [],
        State.approved: [("approve", admin)],
        State.running: [("approve", admin), ("claim", WORKER)],
        State.completed: [("approve", admin), ("claim", WORKER), ("complete", WORKER)],
        State.error: [("approve", admin), ("claim", WORKER), ("fail", WORKER)],
        State.denied: [("deny", admin)],
        State.cancelled: [("cancel", owner)],
    }[state]
    for action, actor in path:
        store.transition(rid, action, actor, worker="w1" if actor is WORKER else None)
    assert store.get(rid).state == state
    return rid


def actor_for(action: str, owner: Actor, admin: Actor) -> Actor:
    who = RULES[action][2]
    return admin if "admin" in who else WORKER if "worker" in who else owner


def jobs(store: Store, rid: str) -> list[tuple[int, str, str, str | None, int]]:
    """The request's Procrastinate jobs: (id, status, lock, queueing lock, attempts)."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id, status, lock, queueing_lock, attempts FROM procrastinate_jobs "
                 "WHERE args->>'request_id' = :r ORDER BY id"), {"r": rid}).all()  # fmt: skip
    return [tuple(r) for r in rows]  # type: ignore[misc]


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("action", list(RULES))
def test_every_action_from_every_state(store: Store, action: str, state: State) -> None:
    alice, _, root = users(store)
    rid = in_state(store, alice, root, state)
    sources, target, _ = RULES[action]
    actor = actor_for(action, alice, root)
    if state in sources:
        req = store.transition(
            rid, action, actor, "why", worker="w1" if actor is WORKER else None, stage="s"
        )
        assert req.state == target
        last = req.transitions[-1]
        assert (last.from_state, last.to_state, last.actor, last.reason) == (
            state,
            target,
            actor.name,
            "why",
        )
    else:
        with pytest.raises(StoreError, match=f"cannot {action} a request that is {state}") as e:
            store.transition(rid, action, actor, worker="w1" if actor is WORKER else None)
        assert e.value.status == 409
        assert store.get(rid).state == state


def test_the_documented_machine() -> None:
    allowed = {(a, s, RULES[a][1]) for a in RULES for s in RULES[a][0]}
    assert ("approve", State.error, State.approved) in allowed  # approving again resumes
    assert ("requeue", State.running, State.approved) in allowed  # a lost worker's request runs elsewhere
    assert ("approve", State.completed, State.approved) not in allowed
    assert {s for a, s, _ in allowed} == set(State) - {State.completed, State.denied, State.cancelled}


def test_approving_queues_one_job_in_the_same_transaction(store: Store) -> None:
    alice, _, root = users(store)
    rid = store.create(alice, **FIELDS).id
    assert jobs(store, rid) == []
    req = store.transition(rid, "approve", root)
    ((job, status, lock, qlock, _),) = jobs(store, rid)
    assert (req.job_id, status, lock, qlock) == (job, "todo", rid, rid)  # one at a time, one queued
    # A stale approval link is refused: the transaction (and its job) rolls back.
    other = store.create(alice, **FIELDS).id
    stale = approvals.Approval(other, root.user_id or 0, version=99, nonce="n1")
    with pytest.raises(approvals.ApprovalRefused, match="out of date"):
        store.transition(other, "approve", root, approval=stale)
    assert jobs(store, other) == [] and store.get(other).state == State.pending
    # Cancelled while queued: the job is cancelled with it.
    store.transition(rid, "cancel", alice)
    assert [j[1] for j in jobs(store, rid)] == ["cancelled"]


def test_cancelling_a_running_request_asks_its_job_to_abort(store: Store) -> None:
    alice, _, root = users(store)
    rid = in_state(store, alice, root, State.approved)
    with store.engine.begin() as conn:  # a worker took the job
        conn.execute(
            text("UPDATE procrastinate_jobs SET status = 'doing' WHERE args->>'request_id' = :r"), {"r": rid}
        )
    store.transition(rid, "claim", WORKER, worker="w1")
    assert store.held_by(rid, "w1") and not store.held_by(rid, "w2")
    store.transition(rid, "cancel", alice)
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT abort_requested FROM procrastinate_jobs")).scalar() is True
    assert not store.held_by(rid, "w1")


def test_who_may_do_what(store: Store) -> None:
    alice, bob, root = users(store)
    rid = store.create(alice, **FIELDS).id
    with pytest.raises(StoreError, match="only admins may approve") as e:
        store.transition(rid, "approve", alice)
    assert e.value.status == 403
    with pytest.raises(StoreError, match=f"no image request {rid}") as e:
        store.transition(rid, "cancel", bob)  # another user's request does not exist for bob
    assert e.value.status == 404
    with pytest.raises(StoreError, match="only workers may claim"):
        store.transition(rid, "claim", root)
    with pytest.raises(StoreError, match="only system or workers may fail"):
        store.transition(rid, "fail", root)
    with pytest.raises(StoreError, match="only system or workers may requeue"):
        store.transition(rid, "requeue", alice)
    assert store.transition(rid, "cancel", alice).state == State.cancelled
    rid2 = store.create(alice, **FIELDS).id
    assert store.transition(rid2, "cancel", root).state == State.cancelled  # admins may cancel too


def test_users_see_their_own_admins_all(store: Store) -> None:
    alice, bob, root = users(store)
    a = store.create(alice, **FIELDS).id
    b = store.create(bob, **FIELDS).id
    assert [r.id for r in store.list_requests(alice)] == [a]
    assert {r.id for r in store.list_requests(root)} == {a, b}
    assert [r.id for r in store.list_requests(root, state="pending", limit=1)] in ([a], [b])
    with pytest.raises(StoreError) as e:
        store.get(b, alice)
    assert e.value.status == 404


def test_history_records_every_transition(store: Store) -> None:
    alice, _, root = users(store)
    rid = store.create(alice, **FIELDS).id
    store.transition(rid, "approve", root, "looks fine")
    store.transition(rid, "claim", WORKER, worker="w1")
    store.transition(rid, "stage", WORKER, worker="w1", stage="30-bootable")
    store.transition(rid, "fail", WORKER, "30-bootable: broken", worker="w1", error="broken")
    store.transition(rid, "approve", root)
    req = store.get(rid)
    rows = [(t.actor, t.from_state, t.to_state, t.stage, t.reason) for t in req.transitions]
    assert rows == [
        ("alice", None, "pending", None, "requested"),
        ("root", "pending", "approved", None, "looks fine"),
        ("w1", "approved", "running", None, "claimed"),
        ("w1", "running", "running", "30-bootable", "moved"),
        ("w1", "running", "error", "30-bootable", "30-bootable: broken"),
        ("root", "error", "approved", "30-bootable", "approved"),
    ]
    assert (req.stage, req.error, req.version) == ("30-bootable", "broken", 6)
    assert all(t.time.tzinfo is not None for t in req.transitions)
    assert len(jobs(store, rid)) == 2  # each approval its own job


def test_a_stale_worker_cannot_finish_a_request_it_lost(store: Store) -> None:
    alice, _, root = users(store)
    rid = in_state(store, alice, root, State.approved)
    store.transition(rid, "claim", WORKER, worker="w1")
    with pytest.raises(StoreError, match="changed meanwhile"):
        store.transition(rid, "complete", Actor("w2", "worker"), worker="w2")
    assert store.get(rid).state == State.running


def test_one_claim_wins(store: Store) -> None:
    alice, _, root = users(store)
    ids = [in_state(store, alice, root, State.approved) for _ in range(6)]
    won: list[tuple[str, str]] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        for rid in ids:
            try:
                store.transition(rid, "claim", Actor(name, "worker"), worker=name)
            except StoreError:
                continue
            with lock:
                won.append((rid, name))

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r for r, _ in won) == sorted(ids)  # each exactly once
    assert all(store.held_by(r, name) for r, name in won)


def _take_job(store: Store, rid: str, heartbeat_age: float) -> int:
    """As a Procrastinate worker would: a worker row whose last heartbeat is that old, the job
    running for it, the request claimed."""
    with store.engine.begin() as conn:
        worker = conn.execute(text("INSERT INTO procrastinate_workers (last_heartbeat) VALUES "
                                   "(now() - make_interval(secs => :a)) RETURNING id"), {"a": heartbeat_age}).scalar()  # fmt: skip
        conn.execute(text("UPDATE procrastinate_jobs SET status = 'doing', worker_id = :w "
                          "WHERE args->>'request_id' = :r AND status = 'todo'"), {"w": worker, "r": rid})  # fmt: skip
    store.transition(rid, "claim", WORKER, worker="w1")
    return int(worker)


def test_requests_of_lost_workers_are_queued_again_then_fail(store: Store) -> None:
    alice, _, root = users(store)
    rid = in_state(store, alice, root, State.approved)
    _take_job(store, rid, heartbeat_age=1)
    assert store.recover_stalled(30, max_lost=2) == []  # its worker is alive
    store.transition(rid, "stage", WORKER, worker="w1", stage="30-bootable")
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE procrastinate_workers SET last_heartbeat = now() - interval '60 seconds'"))
    (req,) = store.recover_stalled(30, max_lost=2)
    assert (req.state, req.stage, req.transitions[-1].actor) == (State.approved, "30-bootable", SYSTEM.name)
    assert "worker w1" in req.transitions[-1].reason and "queued again" in req.transitions[-1].reason
    assert [j[1] for j in jobs(store, rid)] == ["failed", "todo"] and req.job_id == jobs(store, rid)[1][0]
    assert not store.held_by(rid, "w1")  # the lost worker, were it alive, learns it lost the request
    # Lost again, and again: then the request goes to error for an admin to look at.
    _take_job(store, rid, heartbeat_age=60)
    assert store.recover_stalled(30, max_lost=2)[0].state == State.approved
    _take_job(store, rid, heartbeat_age=60)
    (req,) = store.recover_stalled(30, max_lost=2)
    assert req.state == State.error and "lost 3 times in a row" in (req.error or "")
    assert [j[1] for j in jobs(store, rid)] == ["failed"] * 3
    assert store.transition(rid, "approve", root).state == State.approved  # approving resumes


def test_a_heartbeat_written_for_a_worker_keeps_its_requests(store: Store) -> None:
    # The worker writes its stopping worker's heartbeat itself (Procrastinate stops its own).
    alice, _, root = users(store)
    rid = in_state(store, alice, root, State.approved)
    worker = _take_job(store, rid, heartbeat_age=60)
    store.heartbeat(worker)
    assert store.recover_stalled(30, max_lost=2) == [] and store.get(rid).state == State.running


def test_a_worker_acts_for_the_request_s_current_job_only(store: Store) -> None:
    alice, _, root = users(store)
    rid = in_state(store, alice, root, State.approved)
    job = store.get(rid).job_id
    assert job is not None
    with pytest.raises(StoreError, match="changed meanwhile"):  # a job that is not the request's
        store.transition(rid, "claim", WORKER, worker="w1", job=job + 1)
    store.transition(rid, "claim", WORKER, worker="w1", job=job)
    assert store.held_by(rid, "w1", job) and not store.held_by(rid, "w1", job + 1)
    store.transition(rid, "requeue", WORKER, "stopped", worker="w1", job=job)
    store.transition(rid, "claim", WORKER, worker="w1", job=store.get(rid).job_id)
    # The same worker name, the old job (a thread of a restarted worker): refused.
    with pytest.raises(StoreError, match="changed meanwhile"):
        store.transition(rid, "requeue", WORKER, "stopped", worker="w1", job=job)
    assert not store.held_by(rid, "w1", job)


def test_a_worker_lost_before_its_claim_leaves_no_request_without_a_job(store: Store) -> None:
    alice, _, root = users(store)
    rid = in_state(store, alice, root, State.approved)
    with store.engine.begin() as conn:  # fetched by a worker that died before claiming
        worker = conn.execute(text("INSERT INTO procrastinate_workers (last_heartbeat) VALUES "
                                   "(now() - interval '60 seconds') RETURNING id")).scalar()  # fmt: skip
        conn.execute(text("UPDATE procrastinate_jobs SET status = 'doing', worker_id = :w "
                          "WHERE args->>'request_id' = :r"), {"w": worker, "r": rid})  # fmt: skip
    (req,) = store.recover_stalled(30, max_lost=2)
    assert req.state == State.approved and "lost before it claimed" in req.transitions[-1].reason
    assert [j[1] for j in jobs(store, rid)] == ["failed", "todo"] and req.job_id == jobs(store, rid)[1][0]


def test_user_tokens_are_stored_hashed(store: Store) -> None:
    token = store.add_user("carol", email="carol@example.org")
    (carol,) = store.users(["carol"])
    assert token not in carol.token_hash and len(carol.token_hash) == 64
    assert store.user_by_token(token) is not None and store.user_by_token(token + "x") is None
    new = store.new_token("carol")
    assert store.user_by_token(token) is None and store.user_by_token(new) is not None
    with pytest.raises(StoreError, match="exists already"):
        store.add_user("carol")
