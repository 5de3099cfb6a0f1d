"""The request state machine: every action from every state, who may take it, the record of each
transition, the atomic claim and expiring leases. SQLite here; the same tests run against a real
PostgreSQL in tests/integration/test_store_postgres.py (they take the ``store`` fixture)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imaging.errors import StoreError
from imaging.service.store import RULES, SYSTEM, Actor, State, Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'imaging.db'}")
    yield s
    s.close()


FIELDS = dict(
    instance="i-1", name="demo", kind="export", vis=None, shared_with=[], disk_format="qcow2", target="kvm"
)


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
    assert ("approve", State.completed, State.approved) not in allowed
    assert {s for a, s, _ in allowed} == set(State) - {State.completed, State.denied, State.cancelled}


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


def test_a_stale_worker_cannot_finish_a_request_it_lost(store: Store) -> None:
    alice, _, root = users(store)
    rid = in_state(store, alice, root, State.approved)
    store.transition(rid, "claim", WORKER, worker="w1")
    with pytest.raises(StoreError, match="changed meanwhile"):
        store.transition(rid, "complete", Actor("w2", "worker"), worker="w2")
    assert store.get(rid).state == State.running


def test_claim_is_atomic(store: Store) -> None:
    alice, _, root = users(store)
    ids = {in_state(store, alice, root, State.approved) for _ in range(6)}
    claimed: list[str] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while (req := store.claim(name, 60)) is not None:
            with lock:
                claimed.append(req.id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)  # each exactly once
    assert {store.get(i).state for i in ids} == {State.running}


def test_leases_expire_into_error_and_approve_resumes(store: Store) -> None:
    alice, _, root = users(store)
    rid = in_state(store, alice, root, State.approved)
    assert store.claim("w1", 0.2) is not None
    assert store.heartbeat(rid, "w1", 0.2)
    assert not store.heartbeat(rid, "w2", 60)  # not w2's request
    assert store.expire_leases() == []
    time.sleep(0.4)
    assert store.expire_leases() == [rid]
    req = store.get(rid)
    assert req.state == State.error and req.transitions[-1].actor == SYSTEM.name
    assert "approve again to resume" in req.transitions[-1].reason
    assert not store.heartbeat(rid, "w1", 60)  # the lost worker learns it lost the request
    assert store.transition(rid, "approve", root).state == State.approved


def test_user_tokens_are_stored_hashed(store: Store) -> None:
    token = store.add_user("carol", email="carol@example.org")
    (carol,) = store.users(["carol"])
    assert token not in carol.token_hash and len(carol.token_hash) == 64
    assert store.user_by_token(token) is not None and store.user_by_token(token + "x") is None
    new = store.new_token("carol")
    assert store.user_by_token(token) is None and store.user_by_token(new) is not None
    with pytest.raises(StoreError, match="exists already"):
        store.add_user("carol")
