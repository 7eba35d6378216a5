"""``AccessDB``: principals, tokens, payload quotas and ledger queries over one SQLAlchemy engine."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

from sqlalchemy import create_engine, delete, event, func, inspect, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from tpmflow.access.allocations import Allocations
from tpmflow.access.ledger import UNFINISHED
from tpmflow.access.principals import PERMISSIONS, Principal
from tpmflow.access.tables import Base, LedgerEntry, PayloadRow, PrincipalRow, TokenRow
from tpmflow.errors import InvalidRequest, QuotaExceeded, Unauthorized

TOKEN_PREFIX = "tpm_"
SESSION_PREFIX = "tpm_ui_"  # a workbench session's token (AccessDB.create_session)
SESSION_KEPT_S = 86_400.0  # an ended session's row is kept this long ("session expired"), then purged
# The totals ``usage()`` reports per principal or project, in order.
USAGE_COLUMNS = (
    "requests",
    "prompt_tokens",
    "output_tokens",
    "payload_bytes_in",
    "payload_bytes_out",
    "activation_bytes",
)
# Columns added to existing tables after the first release: (table, column, SQL type and default).
# ``create_all`` makes missing tables but never alters existing ones, so ``_migrate`` adds these.
_ADDED_COLUMNS = (
    ("request_ledger", "charge_su", "FLOAT DEFAULT 0 NOT NULL"),
    ("request_ledger", "latency_ms", "FLOAT"),
    ("request_ledger", "ttft_ms", "FLOAT"),
    ("request_ledger", "correlation_id", "VARCHAR(96)"),
    ("request_ledger", "replica_shape", "VARCHAR(32)"),
    ("request_ledger", "queries", "INTEGER DEFAULT 0 NOT NULL"),
    ("request_ledger", "stored_mb_days", "FLOAT DEFAULT 0 NOT NULL"),
    ("tokens", "expires", "FLOAT"),
    ("tokens", "parent_id", "INTEGER"),
)


def add_columns(engine: Engine, added: tuple[tuple[str, str, str], ...]) -> None:
    """Add the ``(table, column, SQL type and default)`` columns a database made by an older
    tpmflow lacks (idempotent; another process doing the same at the same moment is fine: the loser
    sees the column and moves on). ``BLOB`` is written ``BYTEA`` on PostgreSQL."""
    for table, column, decl in added:
        if engine.dialect.name == "postgresql":
            decl = decl.replace("BLOB", "BYTEA")
        if column in {c["name"] for c in inspect(engine).get_columns(table)}:
            continue
        try:
            with engine.begin() as conn:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {decl}"))
        except Exception:
            if column not in {c["name"] for c in inspect(engine).get_columns(table)}:
                raise


def add_indexes(engine: Engine) -> None:
    """Create the tables' declared indexes a database made by an older tpmflow lacks: a column
    added by ``add_columns`` comes without its index (e.g. ``correlation_id``, which the
    workbench's per-request usage looks up). Idempotent, and safe against a racing process."""
    for table in Base.metadata.sorted_tables:
        for index in table.indexes:
            try:
                index.create(engine, checkfirst=True)
            except Exception:
                if index.name not in {i["name"] for i in inspect(engine).get_indexes(table.name)}:
                    raise


def default_database_url() -> str:
    from tpmflow.paths import access_db_path

    path = access_db_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def hash_token(token: str) -> str:
    # Tokens are 256-bit random strings, so a fast hash is enough (no dictionary to attack).
    return hashlib.sha256(token.encode()).hexdigest()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


class AccessDB:
    """The facility's ledger and identity store."""

    def __init__(self, url: str | None = None, auth_cache_s: float = 2.0) -> None:
        """``auth_cache_s``: how long a checked token is trusted without asking the database again
        (the gateway's hot path). Revoking through this object takes effect at once; a revocation
        made by another process (``tpmflow tokens revoke``) within this many seconds."""
        self.url = url or default_database_url()
        self.auth_cache_s = auth_cache_s
        self._auth_cache: dict[str, tuple[Principal | Unauthorized, float]] = {}
        self.engine: Engine = create_engine(self.url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._create_tables()
        self._migrate()
        self.allocations = Allocations(self.engine, cache_s=auth_cache_s)

    def _create_tables(self) -> None:
        """Make the tables a database lacks: all of them on first start, and those added since an
        older tpmflow made it (``reservations``). Gateways starting together on one PostgreSQL may
        race to create the same table; the loser's retry then finds it there."""
        try:
            Base.metadata.create_all(self.engine)
        except Exception:  # noqa: BLE001 - retried once; a real problem fails again, loudly
            Base.metadata.create_all(self.engine)

    def _migrate(self) -> None:
        add_columns(self.engine, _ADDED_COLUMNS)
        add_indexes(self.engine)

    # -- principals and tokens ---------------------------------------------------------------

    def ensure_principal(
        self,
        name: str,
        project: str | None = None,
        permissions: set[str] | None = None,
        service_class: str | None = None,
    ) -> Principal:
        """Create the principal if needed; on an existing one, change only the fields given.

        New principals default to project ``default``, permissions ``generate,embed`` and class
        ``interactive``.
        """
        perms = set(permissions) if permissions is not None else None
        unknown = (perms or set()) - PERMISSIONS
        if unknown:
            raise InvalidRequest(f"unknown permissions {sorted(unknown)}; choose from {sorted(PERMISSIONS)}")
        with Session(self.engine) as s, s.begin():
            row = s.get(PrincipalRow, name)
            if row is None:
                row = PrincipalRow(
                    name=name,
                    project=project or "default",
                    permissions=",".join(sorted(perms if perms is not None else {"generate", "embed"})),
                    service_class=service_class or "interactive",
                    cache_salt=secrets.token_hex(16),
                    created=time.time(),
                )
                s.add(row)
            else:
                if project is not None:
                    row.project = project
                if perms is not None:
                    row.permissions = ",".join(sorted(perms))
                if service_class is not None:
                    row.service_class = service_class
            self._auth_cache.clear()
            return _principal(row)

    def create_token(self, principal: str) -> str:
        """A new bearer token for ``principal``; only its hash is stored, so show it once."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with Session(self.engine) as s, s.begin():
            if s.get(PrincipalRow, principal) is None:
                raise InvalidRequest(f"no principal named {principal!r}")
            s.add(TokenRow(principal=principal, token_hash=hash_token(token), prefix=token[:10], created=time.time()))
        return token

    def create_session(self, token: str, ttl_s: float) -> str:
        """A workbench session: a new token of ``token``'s principal that expires after ``ttl_s``
        and is revoked with ``token`` (so the cookie never holds the long-lived token)."""
        self.authenticate(token)  # a revoked or unknown token opens no session
        session = SESSION_PREFIX + secrets.token_urlsafe(32)
        with Session(self.engine) as s, s.begin():
            parent = s.scalars(select(TokenRow).where(TokenRow.token_hash == hash_token(token))).one()
            # Checked here, not through the (briefly cached) authentication: a token revoked a
            # moment ago opens nothing, and a session opens no session of its own (revoking the
            # token would not reach it, and each hop would extend its life).
            if parent.revoked:
                raise Unauthorized("token revoked")
            if parent.parent_id is not None or parent.expires is not None:
                raise Unauthorized("sign in with a tpmflow token, not a workbench session")
            # Sessions that ended (expired or revoked) over a day ago go: `tokens list` and the
            # table would otherwise grow by a row per sign-in forever.
            ended_before = time.time() - SESSION_KEPT_S
            s.execute(
                delete(TokenRow).where(
                    TokenRow.parent_id.is_not(None),
                    (TokenRow.expires < ended_before) | (TokenRow.revoked < ended_before),
                )
            )
            s.add(
                TokenRow(
                    principal=parent.principal,
                    token_hash=hash_token(session),
                    prefix=session[:14],  # 7 random characters: `tokens revoke PREFIX` names one session
                    created=time.time(),
                    expires=time.time() + ttl_s,
                    parent_id=parent.id,
                )
            )
        return session

    def cached(self, token: str) -> Principal | None:
        """The principal of a token checked less than ``auth_cache_s`` ago; raises for a token found
        unknown or revoked that recently (so spraying bad tokens costs no database queries)."""
        hit = self._auth_cache.get(hash_token(token))
        if hit is None or hit[1] <= time.monotonic():
            return None
        if isinstance(hit[0], Unauthorized):
            raise Unauthorized(str(hit[0]))
        return hit[0]

    def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise Unauthorized("missing bearer token")
        digest = hash_token(token)
        now = time.monotonic()
        hit = self.cached(token)
        if hit is not None:
            return hit
        with Session(self.engine) as s:
            found = s.execute(
                select(TokenRow, PrincipalRow)
                .join(PrincipalRow, TokenRow.principal == PrincipalRow.name)
                .where(TokenRow.token_hash == digest)
            ).first()
        if len(self._auth_cache) > 10_000:
            self._auth_cache.clear()
        expired = found is not None and found[0].expires is not None and found[0].expires <= time.time()
        if found is None or found[0].revoked is not None or expired:
            why = "unknown token" if found is None else ("session expired" if expired else "token has been revoked")
            error = Unauthorized(why)
            self._auth_cache[digest] = (error, now + self.auth_cache_s)
            raise error
        principal = _principal(found[1])
        self._auth_cache[digest] = (principal, now + self.auth_cache_s)
        return principal

    def revoke(self, token_or_prefix: str) -> int:
        """Revoke a token given in full or by the prefix ``tokens list`` shows; returns how many."""
        with Session(self.engine) as s, s.begin():
            rows = s.scalars(
                select(TokenRow).where(
                    (TokenRow.token_hash == hash_token(token_or_prefix)) | (TokenRow.prefix == token_or_prefix)
                )
            ).all()
            for row in rows:
                row.revoked = row.revoked or time.time()
            if rows:  # and the workbench sessions opened with them
                children = s.scalars(select(TokenRow).where(TokenRow.parent_id.in_([r.id for r in rows]))).all()
                for child in children:
                    child.revoked = child.revoked or time.time()
        self._auth_cache.clear()
        return len(rows)

    def list_tokens(self) -> list[dict[str, Any]]:
        with Session(self.engine) as s:
            rows = s.execute(
                select(TokenRow, PrincipalRow)
                .join(PrincipalRow, TokenRow.principal == PrincipalRow.name)
                .order_by(TokenRow.id)
            ).all()
        return [
            {
                "prefix": t.prefix,
                "principal": p.name,
                "project": p.project,
                "permissions": p.permissions,
                "service_class": p.service_class,
                "created": t.created,
                "revoked": t.revoked,
            }
            for t, p in rows
        ]

    # -- payload quotas ------------------------------------------------------------------------

    def register_payload(self, key: str, principal: str, nbytes: int, expires: float, quota_bytes: int | None) -> None:
        """Count a signed payload against the principal's byte quota (expired ones no longer count).

        ``quota_bytes=None`` records without checking: outputs the pool itself wrote must still be
        tracked so they expire, but refusing them after the work is done helps nobody.
        """
        now = time.time()
        with Session(self.engine) as s, s.begin():
            live = (
                s.scalar(
                    select(func.coalesce(func.sum(PayloadRow.nbytes), 0)).where(
                        PayloadRow.principal == principal, PayloadRow.expires > now
                    )
                )
                or 0
            )
            if s.get(PayloadRow, key) is None:
                if quota_bytes is not None and live + nbytes > quota_bytes:
                    raise QuotaExceeded(f"payload store quota: {live + nbytes} bytes > {quota_bytes} for {principal}")
                s.add(PayloadRow(key=key, principal=principal, nbytes=nbytes, expires=expires))

    def pop_expired_payloads(self, now: float | None = None) -> list[tuple[str, str]]:
        """Forget payloads whose lifetime is over; returns their (key, principal) for eviction."""
        now = now or time.time()
        with Session(self.engine) as s, s.begin():
            rows = s.scalars(select(PayloadRow).where(PayloadRow.expires <= now)).all()
            expired = [(r.key, r.principal) for r in rows]
            for r in rows:
                s.delete(r)
        return expired

    # -- usage ---------------------------------------------------------------------------------

    def usage(
        self,
        by: str = "principal",
        principal: str | None = None,
        *,
        since: float | None = None,
        until: float | None = None,
        charges: bool = False,
    ) -> list[dict[str, Any]]:
        """Totals from the ledger grouped by ``principal`` or ``project``, of rows created in
        [since, until) when given; ``charges`` adds ``charge_su`` (the service units charged)."""
        col = LedgerEntry.project if by == "project" else LedgerEntry.principal
        query = (
            select(
                col,
                func.count(),
                func.sum(LedgerEntry.prompt_tokens),
                func.sum(LedgerEntry.output_tokens),
                func.sum(LedgerEntry.payload_bytes_in),
                func.sum(LedgerEntry.payload_bytes_out),
                func.sum(LedgerEntry.activation_bytes),
                func.sum(LedgerEntry.charge_su),
            )
            .where(LedgerEntry.status != UNFINISHED)  # attempts still running count once they end
            .group_by(col)
            .order_by(col)
        )
        if principal is not None:
            query = query.where(LedgerEntry.principal == principal)
        if since is not None:
            query = query.where(LedgerEntry.created >= since)
        if until is not None:
            query = query.where(LedgerEntry.created < until)
        with Session(self.engine) as s:
            rows = s.execute(query).all()
        keys = (by, *USAGE_COLUMNS)
        out = []
        for r in rows:
            entry = dict(zip(keys, (r[0], *(int(v or 0) for v in r[1:-1])), strict=True))
            if charges:
                entry["charge_su"] = float(r[-1] or 0.0)
            out.append(entry)
        return out

    def principals(self) -> list[Principal]:
        """Every principal, by name (the workbench's admin page)."""
        with Session(self.engine) as s:
            return [_principal(row) for row in s.scalars(select(PrincipalRow).order_by(PrincipalRow.name))]

    def recent_rows(self, principal: str | None, limit: int) -> list[LedgerEntry]:
        """The newest ``limit`` finished ledger rows (of ``principal``, when given), oldest first."""
        query = select(LedgerEntry).where(LedgerEntry.status != UNFINISHED)
        if principal is not None:
            query = query.where(LedgerEntry.principal == principal)
        with Session(self.engine) as s:
            rows = list(s.scalars(query.order_by(LedgerEntry.created.desc()).limit(limit)).all())
        return rows[::-1]

    def ledger_rows(self, **where: Any) -> list[LedgerEntry]:
        with Session(self.engine) as s:
            query = select(LedgerEntry)
            for k, v in where.items():
                query = query.where(getattr(LedgerEntry, k) == v)
            return list(s.scalars(query).all())


def _principal(row: PrincipalRow) -> Principal:
    return Principal(
        name=row.name,
        project=row.project,
        permissions=frozenset(row.permissions.split(",")),
        service_class=row.service_class,
        cache_salt=row.cache_salt,
    )
