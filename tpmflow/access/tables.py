"""The tables: principals, their tokens (hashed), signed payloads (for byte quotas), the ledger,
projects' allocations of service units with per-principal caps, and the reservations held on them."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class PrincipalRow(Base):
    __tablename__ = "principals"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(64), index=True)
    permissions: Mapped[str] = mapped_column(String(128))  # comma-separated, sorted
    service_class: Mapped[str] = mapped_column(String(32))
    cache_salt: Mapped[str] = mapped_column(String(64))
    created: Mapped[float] = mapped_column(Float)


class TokenRow(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    principal: Mapped[str] = mapped_column(ForeignKey("principals.name"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created: Mapped[float] = mapped_column(Float)
    revoked: Mapped[float | None] = mapped_column(Float, nullable=True)
    # A workbench session is a token of its own, made at sign-in from the token signed in with:
    # it expires, and revoking its parent revokes it (the parent never goes into a cookie).
    expires: Mapped[float | None] = mapped_column(Float, nullable=True)
    parent_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)


class PayloadRow(Base):
    __tablename__ = "payloads"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    principal: Mapped[str] = mapped_column(String(64), index=True)
    nbytes: Mapped[int] = mapped_column(BigInteger)
    expires: Mapped[float] = mapped_column(Float, index=True)


class LedgerEntry(Base):
    """One row per request attempt. ``request_id`` is the attempt's own id, made by the gateway and
    unique; ``correlation_id`` is the id the client sent (``X-Request-Id``), shared by its retries
    and by any other request that reuses it, so nothing a client sends can merge or hide rows. A
    retry the gateway makes on another replica names the failed attempt in ``retry_of``. A row is
    written when the attempt is sent (``status`` 0, "Unfinished") and completed when it ends; one a
    crashed gateway left unfinished is closed as 502 "Interrupted" by the next sweep."""

    __tablename__ = "request_ledger"

    principal: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(96), primary_key=True)
    retry_of: Mapped[str | None] = mapped_column(String(96), nullable=True)
    project: Mapped[str] = mapped_column(String(64), index=True)
    service_class: Mapped[str] = mapped_column(String(32))
    endpoint: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    content_hash: Mapped[str] = mapped_column(String(80))
    replica_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    payload_bytes_in: Mapped[int] = mapped_column(BigInteger, default=0)
    payload_bytes_out: Mapped[int] = mapped_column(BigInteger, default=0)
    activation_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    queue_ms: Mapped[float] = mapped_column(Float, default=0.0)
    engine_ms: Mapped[float] = mapped_column(Float, default=0.0)
    status: Mapped[int] = mapped_column(Integer)
    error_type: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created: Mapped[float] = mapped_column(Float, index=True)
    # Added after the first release: databases made before it get the column on startup
    # (AccessDB._migrate); the server default keeps older writers working against a migrated table.
    charge_su: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # SLO timings at the gateway (tpmflow.access.slo), added the same way; NULL on rows from before
    # them, and ``ttft_ms`` NULL on attempts that relayed no output (refusals, failures).
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    correlation_id: Mapped[str | None] = mapped_column(String(96), nullable=True, index=True)
    # The serving replica's split, "TP=2 PP=1" (informational: prices do not read it).
    replica_shape: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # Knowledge store: searches made (each query item once) and storage billed (MB x days).
    queries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    stored_mb_days: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")


class AllocationRow(Base):
    """A project's grant of service units for a period [starts, ends), in integer micro-SU.

    ``spent + reserved <= granted`` holds: a reservation is one conditional UPDATE, and a settlement
    replaces a reservation by a charge no larger than it. The one exception: a request whose
    reservation expired under it (its gateway lost the database for longer than the expiry margin)
    still spends what it used, so the allocation may go that far over.
    ``reserved`` is the sum of ``amount`` over the allocation's rows in ``reservations`` (plus any
    held by a gateway from before that table, which has none).
    """

    __tablename__ = "allocations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project: Mapped[str] = mapped_column(String(64), index=True)
    starts: Mapped[float] = mapped_column(Float)
    ends: Mapped[float] = mapped_column(Float)
    granted: Mapped[int] = mapped_column(BigInteger)
    spent: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    created: Mapped[float] = mapped_column(Float)


class AllocationCapRow(Base):
    """The most one principal may draw from one allocation, in integer micro-SU."""

    __tablename__ = "allocation_caps"

    allocation_id: Mapped[int] = mapped_column(ForeignKey("allocations.id"), primary_key=True)
    principal: Mapped[str] = mapped_column(String(64), primary_key=True)
    cap: Mapped[int] = mapped_column(BigInteger)
    spent: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved: Mapped[int] = mapped_column(BigInteger, default=0)


class ReservationRow(Base):
    """One request's reservation on an allocation, so a gateway that crashes before settling cannot
    hold it forever: once ``expires`` is past, any gateway's sweep (or ``tpmflow allocations
    sweep``) deletes the row and gives ``amount`` back. Written in the reservation's transaction,
    deleted in the settlement's; whoever deletes the row is the one who subtracts ``amount``."""

    __tablename__ = "reservations"
    # Ids are never reused (SQLite would hand a deleted row's id to the next one without
    # AUTOINCREMENT): a late settlement must not delete a newer reservation that got its id.
    __table_args__ = {"sqlite_autoincrement": True}

    # BIGSERIAL on PostgreSQL (one id per request); SQLite's rowid alias must be plain INTEGER.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    allocation_id: Mapped[int] = mapped_column(ForeignKey("allocations.id"), index=True)
    project: Mapped[str] = mapped_column(String(64))
    principal: Mapped[str] = mapped_column(String(64))
    capped: Mapped[bool] = mapped_column(Boolean)  # also held on the principal's cap row
    amount: Mapped[int] = mapped_column(BigInteger)  # micro-SU
    gateway: Mapped[str] = mapped_column(String(128))  # host:pid of the gateway that holds it
    created: Mapped[float] = mapped_column(Float)
    expires: Mapped[float] = mapped_column(Float, index=True)  # wall clock; live gateways push it on


class ReplicaRow(Base):
    """A replica as the gateways of its pool last heard of it: the registry that several gateway
    processes (``gateway.workers``) share. Times are wall-clock seconds."""

    __tablename__ = "replicas"

    pool: Mapped[str] = mapped_column(String(32), primary_key=True)  # a digest of the pool secret
    replica_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    info: Mapped[str] = mapped_column(Text)  # ReplicaInfo as JSON (its LoRA list has no bound)
    seen_at: Mapped[float] = mapped_column(Float)  # its last heartbeat
    dead_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # a gateway saw it fail
    draining: Mapped[bool] = mapped_column(Boolean, default=False)
