"""Principals, tokens, payload quotas and the ledger on SQLite (WAL) and on PostgreSQL."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from tpmflow.access import AccessDB, LedgerRow, LedgerWriter
from tpmflow.errors import InvalidRequest, QuotaExceeded, Unauthorized


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"  # PostgreSQL's database is shared between runs


def test_sqlite_uses_wal(tmp_path: Path) -> None:
    db = AccessDB(f"sqlite:///{tmp_path / 'wal.db'}")
    with db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_tokens_are_stored_hashed_and_can_be_revoked(access: AccessDB) -> None:
    name = _name("alice")
    access.ensure_principal(name, "chem", {"generate", "probe"}, "batch")
    token = access.create_token(name)
    with access.engine.connect() as conn:
        stored = [r[0] for r in conn.execute(text("select token_hash from tokens"))]
    assert token not in stored and all(len(h) == 64 for h in stored)
    who = access.authenticate(token)
    assert who.name == name and who.project == "chem" and who.service_class == "batch"
    assert who.can("probe") and not who.can("embed")
    assert access.revoke(token[:10]) == 1
    with pytest.raises(Unauthorized, match="revoked"):
        access.authenticate(token)
    with pytest.raises(Unauthorized):
        access.authenticate("tpm_not-a-token")
    with pytest.raises(Unauthorized):
        access.authenticate(None)


def test_unknown_permission_and_principal(access: AccessDB) -> None:
    with pytest.raises(InvalidRequest):
        access.ensure_principal(_name("x"), permissions={"launch-missiles"})
    with pytest.raises(InvalidRequest):
        access.create_token(_name("nobody"))


def test_each_principal_gets_its_own_cache_salt(access: AccessDB) -> None:
    a = access.ensure_principal(_name("a"))
    b = access.ensure_principal(_name("b"))
    assert a.cache_salt != b.cache_salt and len(a.cache_salt) == 32


def test_ledger_batches_upserts_and_sums(access: AccessDB) -> None:
    name, project = _name("meter"), _name("proj")
    writer = LedgerWriter(access.engine, flush_interval_s=0.05)
    ids = [_name("req") for _ in range(50)]
    for rid in ids:
        writer.record(
            LedgerRow(
                request_id=rid,
                principal=name,
                project=project,
                service_class="interactive",
                endpoint="completions",
                model="m",
                content_hash="blake3:x",
                status=200,
                prompt_tokens=3,
                output_tokens=5,
                payload_bytes_in=7,
            )
        )
    # A retried attempt of the same request id is idempotent: the row is replaced, not duplicated.
    writer.record(
        LedgerRow(
            request_id=ids[0],
            principal=name,
            project=project,
            service_class="interactive",
            endpoint="completions",
            model="m",
            content_hash="blake3:x",
            status=200,
            prompt_tokens=3,
            output_tokens=5,
            payload_bytes_in=7,
        )
    )
    writer.flush()
    writer.close()
    mine = [r for r in access.usage("principal") if r["principal"] == name]
    assert mine == [
        {
            "principal": name,
            "requests": 50,
            "prompt_tokens": 150,
            "output_tokens": 250,
            "payload_bytes_in": 350,
            "payload_bytes_out": 0,
            "activation_bytes": 0,
        }
    ]
    assert [r["requests"] for r in access.usage("project") if r["project"] == project] == [50]


def test_payload_byte_quota(access: AccessDB) -> None:
    name = _name("quota")
    access.ensure_principal(name)
    later = time.time() + 60
    access.register_payload(_name("k"), name, 600, later, quota_bytes=1000)
    with pytest.raises(QuotaExceeded):
        access.register_payload(_name("k"), name, 600, later, quota_bytes=1000)
    access.register_payload(_name("k"), name, 400, later, quota_bytes=1000)  # exactly at the quota
    other = _name("quota")
    access.ensure_principal(other)
    access.register_payload(_name("k"), other, 900, later, quota_bytes=1000)  # quotas are per principal


def test_request_ids_are_per_principal(access: AccessDB) -> None:
    """B reusing A's request id must not overwrite A's row."""
    a, b, rid = _name("a"), _name("b"), _name("shared-id")
    writer = LedgerWriter(access.engine, flush_interval_s=0.05)
    for who, tokens in ((a, 5), (b, 7)):
        writer.record(
            LedgerRow(
                request_id=rid,
                principal=who,
                project="p",
                service_class="interactive",
                endpoint="completions",
                model="m",
                content_hash="h",
                status=200,
                output_tokens=tokens,
            )
        )
    writer.flush()
    writer.close()
    rows = {r.principal: r.output_tokens for r in access.ledger_rows(request_id=rid)}
    assert rows == {a: 5, b: 7}


def test_updating_a_principal_changes_only_given_fields(access: AccessDB) -> None:
    name = _name("admin")
    access.ensure_principal(name, "facility", {"admin", "probe"}, "batch")
    access.ensure_principal(name)  # e.g. `tpmflow tokens create NAME` for one more token
    p = access.ensure_principal(name, service_class="interactive")
    assert p.project == "facility" and p.permissions == {"admin", "probe"} and p.service_class == "interactive"


def test_unknown_tokens_are_cached_negatively(access: AccessDB) -> None:
    with pytest.raises(Unauthorized):
        access.authenticate("tpm_sprayed")
    with pytest.raises(Unauthorized):
        access.cached("tpm_sprayed")  # answered from memory, no database query


def test_a_workbench_session_dies_with_its_token_and_opens_no_session_of_its_own(access: AccessDB) -> None:
    """Sessions are opened from tokens only: a session opens none (revoking the token would not
    reach it, and each hop would extend its life), and a token revoked a moment ago opens none
    even while this process's authentication cache still knows it."""
    import uuid

    name = "s-" + uuid.uuid4().hex[:8]
    access.ensure_principal(name, "p", {"generate"})
    token = access.create_token(name)
    session = access.create_session(token, 60)
    assert access.authenticate(session).name == name
    with pytest.raises(Unauthorized, match="not a workbench session"):
        access.create_session(session, 60)
    access.authenticate(token)  # warm the cache, then revoke behind its back
    other = access.create_token(name)
    access.authenticate(other)
    from sqlalchemy import update

    from tpmflow.access.db import hash_token
    from tpmflow.access.tables import TokenRow

    with access.engine.begin() as conn:  # as another gateway's revoke would: this cache never hears of it
        conn.execute(update(TokenRow).where(TokenRow.token_hash == hash_token(other)).values(revoked=1.0))
    with pytest.raises(Unauthorized, match="revoked"):
        access.create_session(other, 60)
    assert access.revoke(token) == 1
    with pytest.raises(Unauthorized):
        access.authenticate(session)


def test_sessions_that_ended_over_a_day_ago_are_purged_at_the_next_sign_in(access: AccessDB) -> None:
    import uuid

    from sqlalchemy import select, update

    from tpmflow.access.db import SESSION_KEPT_S, hash_token
    from tpmflow.access.tables import TokenRow

    name = "p-" + uuid.uuid4().hex[:8]
    access.ensure_principal(name, "p", {"generate"})
    token = access.create_token(name)
    old, revoked, recent, fresh = (access.create_session(token, 60) for _ in range(4))
    long_ago, an_hour_ago = time.time() - SESSION_KEPT_S - 60, time.time() - 3600
    with access.engine.begin() as conn:
        def age(session: str, **values: float) -> None:
            conn.execute(update(TokenRow).where(TokenRow.token_hash == hash_token(session)).values(**values))

        age(old, expires=long_ago)  # expired a day and a minute ago
        age(revoked, revoked=long_ago)  # revoked as long ago (its expiry still ahead)
        age(recent, expires=an_hour_ago)  # ended an hour ago: kept, it still says "session expired"
    with pytest.raises(Unauthorized, match="session expired"):
        access.authenticate(old)
    newest = access.create_session(token, 60)
    with access.engine.connect() as conn:
        kept = set(conn.scalars(select(TokenRow.token_hash).where(TokenRow.principal == name)))
    assert kept == {hash_token(t) for t in (token, recent, fresh, newest)}, "only the sessions ended a day ago went"
    with pytest.raises(Unauthorized, match="session expired"):
        access.authenticate(recent)
    assert access.authenticate(fresh).name == name
