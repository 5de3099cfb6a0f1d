"""Approval links: signed, expiring, bound to the request's version, usable once."""

from __future__ import annotations

import time

import pytest

from imaging.service import approvals
from imaging.service.store import Actor, Store

KEY = "k" * 40


def test_a_link_names_its_request_admin_and_version() -> None:
    token = approvals.sign_approval(KEY, "ir-0123456789ab", 7, 3)
    a = approvals.check_approval(KEY, token, 60)
    assert (a.request_id, a.admin_id, a.version) == ("ir-0123456789ab", 7, 3) and len(a.nonce) >= 16
    assert approvals.check_approval(KEY, approvals.sign_approval(KEY, "x", 1, 1), 60).nonce != a.nonce


def test_an_expired_link_is_refused() -> None:
    old = approvals.sign_approval(KEY, "ir-0123456789ab", 7, 3, now=time.time() - 3601)
    with pytest.raises(approvals.ApprovalRefused, match="expired") as e:
        approvals.check_approval(KEY, old, 3600)
    assert e.value.status == 410
    assert approvals.check_approval(KEY, old, 7200).admin_id == 7


@pytest.mark.parametrize(
    "mangle", [lambda t: t[:-2] + "xx", lambda t: "A" + t[1:], lambda t: t + ".", lambda t: "nonsense"]
)
def test_a_tampered_link_is_refused(mangle: object) -> None:
    token = approvals.sign_approval(KEY, "ir-0123456789ab", 7, 3)
    with pytest.raises(approvals.ApprovalRefused, match="not valid") as e:
        approvals.check_approval(KEY, mangle(token), 60)  # type: ignore[operator]
    assert e.value.status == 403


def test_another_key_is_refused() -> None:
    token = approvals.sign_approval(KEY, "ir-0123456789ab", 7, 3)
    with pytest.raises(approvals.ApprovalRefused, match="not valid"):
        approvals.check_approval("other" * 8, token, 60)


def test_a_link_works_once_and_only_for_the_state_it_was_made_in(database: str) -> None:
    store = Store(database)
    store.add_user("alice")
    store.add_user("root", admin=True)
    alice, root = store.users()
    rid = store.create(Actor("alice", "user", alice.id), instance="i", name="n", kind="export", vis=None,
                       shared_with=[], disk_format="raw", target="kvm", options={}).id  # fmt: skip
    admin = Actor("root", "admin", root.id)
    token = approvals.sign_approval(KEY, rid, root.id, store.get(rid).version)
    stale = approvals.sign_approval(KEY, rid, root.id, store.get(rid).version)
    first = approvals.check_approval(KEY, token, 60)
    assert store.transition(rid, "approve", admin, approval=first).state == "approved"
    with pytest.raises(approvals.ApprovalRefused, match="used already") as e:
        store.transition(rid, "approve", admin, approval=first)
    assert e.value.status == 409
    # An unused link made before the request moved on: out of date (after a failure, the error
    # mail carries a new one).
    for action in ("claim", "fail"):
        store.transition(rid, action, Actor("w", "worker"), worker="w")
    with pytest.raises(approvals.ApprovalRefused, match="out of date: the request is error now"):
        store.transition(rid, "approve", admin, approval=approvals.check_approval(KEY, stale, 60))
    store.close()


def test_bearer_tokens_are_random_and_hashed() -> None:
    a, b = approvals.new_token(), approvals.new_token()
    assert a != b and a.startswith("imaging_") and len(a) > 40
    assert approvals.hash_token(a) == approvals.hash_token(a) != approvals.hash_token(b)
