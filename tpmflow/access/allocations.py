"""Allocations: a project's service units for a period, drawn by its principals (optionally capped).

Admission reserves a request's largest possible charge with one conditional UPDATE (``... WHERE
granted - spent - reserved >= amount``, then checks the row count) and settlement swaps that
reservation for the real charge. The database does the arithmetic under its own row lock, so any
number of gateways sharing one PostgreSQL (or threads sharing one SQLite file) can never overspend;
no Python lock is involved. Amounts are integer micro-SU, so sums and comparisons are exact.

A project with no allocation at all is unlimited (nothing is reserved); one whose allocations all
lie outside the current time is refused.

Each reservation is also a row in ``reservations``, inserted in the reserving transaction and
deleted in the settling one, with an expiry: its request's deadline plus ``EXPIRY_MARGIN_S``. A live
gateway pushes the expiry of its own reservations on (``renew``, every ``RENEW_EVERY_S``), so a
stream that outlives its deadline keeps its reservation; a gateway that crashed stops renewing, and
once its reservations expire any gateway's ``sweep`` gives them back. Settling and sweeping both
start with ``DELETE ... WHERE id = ...``: the one whose DELETE removed the row subtracts the amount
from ``reserved``, so a reservation is released exactly once however many gateways race.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from tpmflow.access.costs import MICRO, to_micro
from tpmflow.access.tables import AllocationCapRow, AllocationRow, ReservationRow
from tpmflow.errors import InvalidRequest, QuotaExceeded

log = logging.getLogger("tpmflow.allocations")

# How long a reservation outlives its request's deadline, and its gateway's last renewal: a live
# gateway renews every RENEW_EVERY_S, so only one silent for the whole margin (crashed, or cut off
# from the database) loses its reservations. Also absorbs clock skew between gateway hosts (expiries
# are wall-clock times compared by whichever gateway sweeps).
EXPIRY_MARGIN_S = 120.0
RENEW_EVERY_S = 30.0
# Expiry of reservations made outside a gateway (no deadline is known there).
DEFAULT_TTL_S = 900.0
_CHUNK = 500  # ids per renewing UPDATE (well under SQLite's bound-parameter limit)


@dataclass(frozen=True)
class Reservation:
    """What admission set aside for one request; :meth:`Allocations.settle` spends or releases it."""

    allocation_id: int
    project: str
    principal: str
    capped: bool
    micro: int
    id: int  # its row in ``reservations``

    @property
    def su(self) -> float:
        return self.micro / MICRO


@dataclass(frozen=True)
class _Active:
    """A project's standing, as admission needs it (cached for ``cache_s``)."""

    limited: bool  # the project has at least one allocation
    allocation_id: int | None  # the one covering now
    capped: bool  # the principal has a cap on it


class Allocations:
    """Allocations, caps, reservations and settlements over the access database's engine."""

    def __init__(self, engine: Engine, cache_s: float = 2.0) -> None:
        """``cache_s``: how long admission trusts what it learnt of a project (no allocation, or
        which one is current). Changes made through this object apply at once; made elsewhere
        (``tpmflow allocations …`` in another process), within this many seconds. Balances are
        never cached: every reservation is checked by the database."""
        self.engine = engine
        self.cache_s = cache_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}"[:128]  # recorded on its reservations
        self._cache: dict[tuple[str, str], tuple[_Active, float]] = {}
        self._cache_lock = threading.Lock()
        self._live: set[int] = set()  # reservations made here and not settled yet: renewed, never swept
        self._live_lock = threading.Lock()
        self._renew_lock = threading.Lock()  # one renewal at a time: no two UPDATEs locking rows in turn

    # -- administration ------------------------------------------------------------------------

    def create(
        self,
        project: str,
        su: float,
        starts: float | None = None,
        ends: float | None = None,
        caps: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Grant ``su`` to ``project`` for [starts, ends) (default: from now, for 365 days)."""
        starts = time.time() if starts is None else starts
        ends = starts + 365 * 86400 if ends is None else ends
        if su <= 0:
            raise InvalidRequest("an allocation grants a positive number of SU")
        if ends <= starts:
            raise InvalidRequest("an allocation must end after it starts")
        with Session(self.engine) as s, s.begin():
            overlap = s.scalar(
                select(AllocationRow.id).where(
                    AllocationRow.project == project, AllocationRow.starts < ends, AllocationRow.ends > starts
                )
            )
            if overlap is not None:
                raise InvalidRequest(f"project {project!r} already has allocation {overlap} in that period")
            row = AllocationRow(
                project=project,
                starts=starts,
                ends=ends,
                granted=to_micro(su),
                spent=0,
                reserved=0,
                created=time.time(),
            )
            s.add(row)
            s.flush()
            for principal, cap in (caps or {}).items():
                s.add(
                    AllocationCapRow(allocation_id=row.id, principal=principal, cap=to_micro(cap), spent=0, reserved=0)
                )
            allocation_id = row.id
        self._forget()
        return self.show(project, allocation_id=allocation_id)[0]

    def topup(self, project: str, su: float, allocation_id: int | None = None) -> dict[str, Any]:
        """Add ``su`` to the project's current allocation (or the one named)."""
        if su <= 0:
            raise InvalidRequest("a top-up adds a positive number of SU")
        target = allocation_id or self._current_id(project)
        with self.engine.begin() as conn:
            done = conn.execute(
                update(AllocationRow)
                .where(AllocationRow.id == target, AllocationRow.project == project)
                .values(granted=AllocationRow.granted + to_micro(su))
            ).rowcount
        if done != 1:
            raise InvalidRequest(f"project {project!r} has no allocation {target}")
        self._forget()
        return self.show(project, allocation_id=target)[0]

    def set_cap(self, project: str, principal: str, su: float | None, allocation_id: int | None = None) -> None:
        """Cap what ``principal`` may draw from the project's current allocation (``None`` lifts it)."""
        target = allocation_id or self._current_id(project)
        with Session(self.engine) as s, s.begin():
            row = s.get(AllocationCapRow, (target, principal))
            if su is None:
                if row is not None:
                    s.delete(row)
            elif row is None:
                s.add(
                    AllocationCapRow(allocation_id=target, principal=principal, cap=to_micro(su), spent=0, reserved=0)
                )
            else:
                row.cap = to_micro(su)
        self._forget()

    def show(self, project: str | None = None, *, allocation_id: int | None = None) -> list[dict[str, Any]]:
        """Allocations (all, or a project's) with balances in SU and their caps."""
        now = time.time()
        with Session(self.engine) as s:
            query = select(AllocationRow).order_by(AllocationRow.project, AllocationRow.starts)
            if project is not None:
                query = query.where(AllocationRow.project == project)
            if allocation_id is not None:
                query = query.where(AllocationRow.id == allocation_id)
            rows = s.scalars(query).all()
            caps = s.scalars(
                select(AllocationCapRow).where(AllocationCapRow.allocation_id.in_([r.id for r in rows]))
            ).all()
        out = []
        for r in rows:
            out.append(
                {
                    "id": r.id,
                    "project": r.project,
                    "starts": r.starts,
                    "ends": r.ends,
                    "active": r.starts <= now < r.ends,
                    "granted_su": r.granted / MICRO,
                    "spent_su": r.spent / MICRO,
                    "reserved_su": r.reserved / MICRO,
                    "balance_su": (r.granted - r.spent) / MICRO,
                    "available_su": (r.granted - r.spent - r.reserved) / MICRO,
                    "caps": {
                        c.principal: {
                            "cap_su": c.cap / MICRO,
                            "spent_su": c.spent / MICRO,
                            "reserved_su": c.reserved / MICRO,
                        }
                        for c in caps
                        if c.allocation_id == r.id
                    },
                }
            )
        return out

    # -- admission -----------------------------------------------------------------------------

    def unlimited(self, project: str) -> bool:
        """True when the project was seen without any allocation less than ``cache_s`` ago: the
        gateway then admits without a database query (or computing a bound)."""
        hit = self._cache.get((project, ""))
        return hit is not None and hit[1] > time.monotonic() and not hit[0].limited

    def reserve(
        self, project: str, principal: str, su: float, now: float | None = None, ttl_s: float = DEFAULT_TTL_S
    ) -> Reservation | None:
        """Set aside ``su`` (rounded down to a micro-SU) of the project's current allocation and of
        the principal's cap; ``None`` for an unlimited project. Raises ``QuotaExceeded`` with the
        balance when either cannot cover it. Unless settled or renewed, it expires ``ttl_s`` from
        ``now`` (a gateway passes its request timeout plus ``EXPIRY_MARGIN_S``)."""
        # Rounded down: N reservations of x fit a grant of N·x (rounded up, a grant of exactly 10 x
        # 0.656000075 SU admitted 9). The charge is capped by the reservation, so a request may be
        # charged up to 1 micro-SU less than its exact price; never more, and nothing overspends.
        micro = max(0, to_micro(su, down=True))
        for fresh in (False, True):
            now_ = time.time() if now is None else now
            active = self._active(project, principal, now_, fresh)
            if not active.limited:
                return None
            if active.allocation_id is None:
                if fresh:
                    raise QuotaExceeded(f"project {project!r} has no allocation covering now: balance 0 SU")
                continue
            held = self._try_reserve(active, project, principal, micro, now_, now_ + ttl_s)
            if held is not None:
                with self._live_lock:
                    self._live.add(held)
                return Reservation(active.allocation_id, project, principal, active.capped, micro, held)
            if fresh:
                raise QuotaExceeded(self._refusal(active, project, principal, micro))
            # What we cached may be stale (allocation ended, cap added): look again once.
        raise AssertionError("unreachable")

    def settle(self, reservation: Reservation, charge_su: float) -> float:
        """Release the reservation and spend the real charge (never more than was reserved);
        returns the SUs spent. A failed request settles with what it used, often 0.

        If a sweep released the reservation already (it expired: this gateway could not renew it
        for the whole margin), only the charge is spent: the work was done and its ledger row bills
        it, and subtracting the reservation again would hand the project SUs it never had. On
        failure the reservation is no longer renewed, so it expires and a sweep releases it."""
        spent = min(max(0, to_micro(charge_su)), reservation.micro)
        held = False
        try:
            with self.engine.begin() as conn:
                held = self._drop(conn, reservation)
                freed = reservation.micro if held else 0
                self._adjust(conn, reservation, -freed, spent)
        finally:
            with self._live_lock:
                self._live.discard(reservation.id)
        if not held:
            log.warning(
                "reservation %d (%g SU, project %r) had expired and been swept before settling; spent %g SU without it",
                reservation.id,
                reservation.su,
                reservation.project,
                spent / MICRO,
            )
        return spent / MICRO

    # -- expiry ----------------------------------------------------------------------------------

    def renew(self, now: float | None = None, margin_s: float = EXPIRY_MARGIN_S) -> int:
        """Push the expiry of every reservation this process holds to at least ``now + margin_s``
        (never earlier than it was): what keeps a long stream's reservation from being swept.
        Returns how many rows it touched."""
        until = (time.time() if now is None else now) + margin_s
        with self._live_lock:
            ids = sorted(self._live)
        r = ReservationRow
        touched = 0
        with self._renew_lock:
            for i in range(0, len(ids), _CHUNK):
                with self.engine.begin() as conn:
                    touched += conn.execute(
                        update(r).where(r.id.in_(ids[i : i + _CHUNK]), r.expires < until).values(expires=until)
                    ).rowcount
        return touched

    def sweep(self, now: float | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Release reservations whose expiry is past (their gateway crashed, or could not renew
        them for the whole margin), oldest first, at most ``limit``; returns what it released.

        Each is one transaction: DELETE the row (still expired: a renewal may have just moved it),
        and only if that removed it, subtract its amount from the allocation (and the cap). Another
        gateway sweeping, or its owner settling, at the same moment finds the row gone and does
        nothing. Reservations this process holds are skipped: it renews them itself."""
        now_ = time.time() if now is None else now
        r = ReservationRow
        with self.engine.connect() as conn:
            expired = conn.execute(select(r).where(r.expires <= now_).order_by(r.expires).limit(limit)).all()
        with self._live_lock:
            mine = set(self._live)
        released = []
        for row in expired:
            if row.id in mine:
                continue
            with self.engine.begin() as conn:
                held = Reservation(row.allocation_id, row.project, row.principal, row.capped, row.amount, row.id)
                if not self._drop(conn, held, expired_by=now_):
                    continue
                self._adjust(conn, held, -row.amount, 0)
            released.append(
                {
                    "id": row.id,
                    "allocation_id": row.allocation_id,
                    "project": row.project,
                    "principal": row.principal,
                    "su": row.amount / MICRO,
                    "gateway": row.gateway,
                    "created": row.created,
                    "expires": row.expires,
                }
            )
        if released:
            log.warning("released %d expired reservation(s): %s", len(released), released[:5])
        return released

    # -- internals -----------------------------------------------------------------------------

    def _try_reserve(
        self, active: _Active, project: str, principal: str, micro: int, now: float, expires: float
    ) -> int | None:
        """Both conditional UPDATEs and the reservation's row in one transaction: the project's
        allocation, then the cap (one order everywhere, so concurrent transactions cannot deadlock);
        returns the row's id, ``None`` if refused. The write comes first, so SQLite takes its write
        lock at once instead of upgrading a stale read snapshot."""
        a, c = AllocationRow, AllocationCapRow
        with self.engine.connect() as conn:
            with conn.begin() as tx:
                done = conn.execute(
                    update(a)
                    .where(
                        a.id == active.allocation_id,
                        a.starts <= now,
                        a.ends > now,
                        a.granted - a.spent - a.reserved >= micro,
                    )
                    .values(reserved=a.reserved + micro)
                ).rowcount
                if done != 1:
                    tx.rollback()
                    return None
                if active.capped:
                    done = conn.execute(
                        update(c)
                        .where(
                            c.allocation_id == active.allocation_id,
                            c.principal == principal,
                            c.cap - c.spent - c.reserved >= micro,
                        )
                        .values(reserved=c.reserved + micro)
                    ).rowcount
                    if done != 1:
                        tx.rollback()
                        return None
                row = {
                    "allocation_id": active.allocation_id,
                    "project": project,
                    "principal": principal,
                    "capped": active.capped,
                    "amount": micro,
                    "gateway": self.owner,
                    "created": now,
                    "expires": expires,
                }
                key = conn.execute(insert(ReservationRow).values(**row)).inserted_primary_key
                assert key is not None  # a single-row INSERT always has one
        return int(key[0])

    @staticmethod
    def _drop(conn: Connection, held: Reservation, expired_by: float | None = None) -> bool:
        """Delete a reservation's row (only if expired by then, when given): True for whoever
        removed it, which is then the one to give its amount back. Matched on all it holds, not
        only the id, as a second guard against ever deleting another reservation's row."""
        r = ReservationRow
        query = delete(r).where(
            r.id == held.id,
            r.allocation_id == held.allocation_id,
            r.principal == held.principal,
            r.amount == held.micro,
        )
        if expired_by is not None:
            query = query.where(r.expires <= expired_by)
        return conn.execute(query).rowcount == 1

    @staticmethod
    def _adjust(conn: Connection, held: Reservation, reserved: int, spent: int) -> None:
        """Add ``reserved`` and ``spent`` (micro-SU) to the allocation's balances, then the cap's."""
        if reserved == 0 and spent == 0:
            return
        a, c = AllocationRow, AllocationCapRow
        conn.execute(
            update(a).where(a.id == held.allocation_id).values(reserved=a.reserved + reserved, spent=a.spent + spent)
        )
        if held.capped:
            conn.execute(
                update(c)
                .where(c.allocation_id == held.allocation_id, c.principal == held.principal)
                .values(reserved=c.reserved + reserved, spent=c.spent + spent)
            )

    def _active(self, project: str, principal: str, now: float, fresh: bool) -> _Active:
        key = (project, principal)
        hit = self._cache.get(key)
        if not fresh and hit is not None and hit[1] > time.monotonic():
            return hit[0]
        with Session(self.engine) as s:
            ids = s.execute(
                select(AllocationRow.id, AllocationRow.starts, AllocationRow.ends).where(
                    AllocationRow.project == project
                )
            ).all()
            current = next((i for i, st, en in ids if st <= now < en), None)
            capped = current is not None and s.get(AllocationCapRow, (current, principal)) is not None
        active = _Active(limited=bool(ids), allocation_id=current, capped=capped)
        expires = time.monotonic() + self.cache_s
        with self._cache_lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (active, expires)
            # The project-level entry (what unlimited() and _current_id read) has no principal's cap.
            self._cache[(project, "")] = (_Active(active.limited, active.allocation_id, False), expires)
        return active

    def _refusal(self, active: _Active, project: str, principal: str, micro: int) -> str:
        """Why a reservation failed, with the balance (read after the fact, so only indicative)."""
        with Session(self.engine) as s:
            a = s.get(AllocationRow, active.allocation_id)
            cap = s.get(AllocationCapRow, (active.allocation_id, principal)) if active.capped else None
        need = f"this request may cost up to {micro / MICRO:g} SU"
        if a is None:
            return f"project {project!r}: allocation {active.allocation_id} is gone; balance 0 SU; {need}"
        if cap is not None and cap.cap - cap.spent - cap.reserved < micro:
            return (
                f"principal {principal!r} cap on project {project!r}: balance {(cap.cap - cap.spent) / MICRO:g} SU "
                f"of {cap.cap / MICRO:g} ({cap.reserved / MICRO:g} reserved by requests in flight); {need}"
            )
        return (
            f"project {project!r} allocation {a.id}: balance {(a.granted - a.spent) / MICRO:g} SU "
            f"of {a.granted / MICRO:g} ({a.reserved / MICRO:g} reserved by requests in flight); {need}"
        )

    def _current_id(self, project: str) -> int:
        active = self._active(project, "", time.time(), fresh=True)
        if active.allocation_id is None:
            raise InvalidRequest(f"project {project!r} has no allocation covering now; name one by id")
        return active.allocation_id

    def _forget(self) -> None:
        with self._cache_lock:
            self._cache.clear()
