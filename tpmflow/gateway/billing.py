"""Billing: reserve a request's largest possible charge before admission, charge each attempt's
ledger row in service units, settle the reservation after; the ledger row and metrics of every
attempt are written here."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from tpmflow.access import AccessDB, LedgerRow, LedgerWriter, Reservation
from tpmflow.access.allocations import EXPIRY_MARGIN_S, RENEW_EVERY_S
from tpmflow.access.costs import Limits, max_charge
from tpmflow.access.ledger import UNFINISHED, close_unfinished
from tpmflow.config import PoolConfig
from tpmflow.errors import QuotaExceeded
from tpmflow.gateway.call import Attempts, Call
from tpmflow.gateway.metrics import GatewayMetrics
from tpmflow.gateway.ratelimit import RateLimiter
from tpmflow.knowledge.store import KnowledgeStore, StorageBill
from tpmflow.pool.registry import ReplicaRegistry, ReplicaState, lora_for

log = logging.getLogger("tpmflow.gateway")


def served_version(call: Call, replica: ReplicaState) -> str:
    """The version answering ``call`` on ``replica``: a pinned LoRA adapter's, else its weights'."""
    return lora_for(replica, call.version) or replica.info.content_hash


class Billing:
    """Reservations, charges and the ledger of one gateway."""

    def __init__(
        self,
        cfg: PoolConfig,
        access: AccessDB,
        ledger: LedgerWriter,
        metrics: GatewayMetrics,
        rate_limits: RateLimiter,
        registry: ReplicaRegistry,
    ) -> None:
        self.cfg = cfg
        self.access = access
        self.ledger = ledger
        self.metrics = metrics
        self.rate_limits = rate_limits
        self.registry = registry
        self.model_name = cfg.model_name()

    # -- allocations: reserve before admission, settle after -----------------------------------

    def limits(self) -> Limits:
        """The pool limits that bound one request's use (replicas report their engine's own)."""
        live = self.registry.live()
        return Limits(
            max_model_len=max([r.info.max_model_len for r in live] + [self.cfg.engine.max_model_len]),
            hidden_size=max((r.info.hidden_size for r in live), default=0),
            max_activation_bytes=self.cfg.max_activation_bytes,
            request_timeout_s=self.cfg.gateway.request_timeout_s,
        )

    async def reserve(self, call: Call, body: dict[str, Any] | None) -> None:
        """Reserve the most this request can cost from its project's allocation (atomic in the
        database, so gateways sharing it cannot overspend together). Unlimited projects — no
        allocation at all — pass on a cached answer without touching the database."""
        allocations = self.access.allocations
        project = call.principal.project
        if allocations.unlimited(project):
            return
        bound = max_charge(
            self.cfg.costs, call.principal.service_class, call.endpoint, body, call.body_bytes, self.limits()
        )
        # Expires at the request's deadline plus a margin; keep_reservations renews it meanwhile.
        ttl_s = self.cfg.gateway.request_timeout_s + EXPIRY_MARGIN_S
        reserving = asyncio.ensure_future(
            asyncio.to_thread(allocations.reserve, project, call.principal.name, bound, ttl_s=ttl_s)
        )
        try:
            call.reservation = await asyncio.shield(reserving)
        except QuotaExceeded:
            self.record(call, 429, error_type="QuotaExceeded")
            raise
        except asyncio.CancelledError:
            # The client left while the database reserved: the thread finishes anyway, so give the
            # SUs back once it has, or they would stay held with no request to settle them.
            reserving.add_done_callback(self._release_abandoned)
            raise

    def _release_abandoned(self, reserving: asyncio.Future[Reservation | None]) -> None:
        if reserving.cancelled() or reserving.exception() is not None or reserving.result() is None:
            return
        threading.Thread(target=self.access.allocations.settle, args=(reserving.result(), 0.0), daemon=True).start()

    async def settle(self, call: Call) -> None:
        """Swap the reservation for the real charge (at most the reservation). Runs in a thread that
        completes even if the request task is cancelled meanwhile."""
        reservation, call.reservation = call.reservation, None
        if reservation is None:
            return
        try:
            await asyncio.to_thread(self.access.allocations.settle, reservation, call.charged_su)
        except Exception:  # noqa: BLE001 - held until it expires and a sweep frees it (never an overspend)
            log.exception("settling %s SU reserved for %s failed", reservation.su, call.request_id)

    async def keep_reservations(self) -> None:
        """Every RENEW_EVERY_S: renew this gateway's reservations in flight (a stream may outlive its
        deadline, and must not lose its reservation), then release any gateway's expired ones (it
        crashed between reserving and settling)."""
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            try:
                await asyncio.to_thread(self.keep_reservations_now)
            except Exception:  # noqa: BLE001 - the sweep must never take the gateway down
                log.exception("renewing or sweeping reservations failed")

    def keep_reservations_now(self, now: float | None = None) -> int:
        """One renewal and sweep (``now``: a wall-clock time, for tests); returns how many expired
        reservations it released. Ledger rows left unfinished as long (their gateway died) are
        closed as "Interrupted" on the way."""
        self.access.allocations.renew(now)
        released = len(self.access.allocations.sweep(now))
        self.close_interrupted(now)
        return released

    def close_interrupted(self, now: float | None = None) -> int:
        """Close the rows of attempts no live gateway can still be serving: unfinished for longer
        than a request may take (its timeout) plus the reservations' expiry margin."""
        now = time.time() if now is None else now
        return close_unfinished(self.access.engine, now - self.cfg.gateway.request_timeout_s - EXPIRY_MARGIN_S)

    # -- knowledge storage -----------------------------------------------------------------------

    def storage(self, bills: list[StorageBill]) -> list[LedgerRow]:
        """One ledger row per collection's billing period (endpoint ``knowledge/storage``, charged
        to its creator and project, SU per MB-day), spent from the project's allocation. When the
        allocation cannot cover it the row keeps the charge with status 429 ``QuotaExceeded``: the
        debt is on record, nothing is spent beyond the grant."""
        rows = []
        for bill in bills:
            try:
                rows.append(self._storage_row(bill))
            except Exception:  # noqa: BLE001 - the other bills still go in; this period stays claimed
                log.exception("billing the storage of collection %s failed", bill.collection)
        return rows

    def _storage_row(self, bill: StorageBill) -> LedgerRow:
        row = LedgerRow(
            request_id=Attempts.new_id(),
            correlation_id=f"storage:{bill.collection}",
            principal=bill.principal,
            project=bill.project,
            service_class="storage",
            endpoint="knowledge/storage",
            model=self.model_name,
            content_hash="",
            status=200,
            stored_mb_days=bill.mb_days,
            created=bill.until,
        )
        row.charge_su = self.cfg.costs.charge_of(row)
        try:
            held = self.access.allocations.reserve(bill.project, bill.principal, row.charge_su)
            if held is not None:
                self.access.allocations.settle(held, row.charge_su)
        except QuotaExceeded:
            row.status, row.error_type = 429, "QuotaExceeded"
        self.ledger.record(row)
        return row

    def bill_storage_now(self, knowledge: KnowledgeStore, now: float | None = None) -> list[LedgerRow]:
        return self.storage(knowledge.bill_storage(now))

    async def bill_storage(self, knowledge: KnowledgeStore) -> None:
        """Every ``gateway.storage_billing_s``: bill what the collections stored since last time."""
        while True:
            await asyncio.sleep(self.cfg.gateway.storage_billing_s)
            try:
                await asyncio.to_thread(self.bill_storage_now, knowledge)
            except Exception:  # noqa: BLE001 - billing must never take the gateway down
                log.exception("billing knowledge storage failed")

    # -- the ledger -----------------------------------------------------------------------------

    def _charge(self, call: Call, row: LedgerRow) -> float:
        """This row's SUs from its own counters. A request never costs more than it reserved: only a
        stream outliving the request timeout could, and its excess engine time goes unbilled."""
        charge = self.cfg.costs.charge_of(row)
        if call.reservation is not None:
            charge = max(0.0, min(charge, call.reservation.su - call.charged_su))
        call.charged_su += charge
        return charge

    def _row(
        self, call: Call, attempt_id: str | None, retry_of: str | None, replica: ReplicaState | None, **counters: Any
    ) -> LedgerRow:
        """A ledger row of ``call``'s attempt: who, what, where; ``counters`` the rest."""
        p = call.principal
        return LedgerRow(
            request_id=attempt_id or Attempts.new_id(),
            correlation_id=call.request_id,
            retry_of=retry_of,
            principal=p.name,
            project=p.project,
            service_class=p.service_class,
            endpoint=call.endpoint,
            model=replica.info.model if replica and replica.info.task == "embed" else self.model_name,
            content_hash=served_version(call, replica) if replica else call.content_hash,
            replica_id=replica.info.replica_id if replica else None,
            replica_shape=f"TP={replica.info.tensor_parallel} PP={replica.info.pipeline_parallel}" if replica else None,
            queue_ms=call.queue_ms,
            **counters,
        )

    def opened(self, call: Call, attempt_id: str, retry_of: str | None, replica: ReplicaState) -> None:
        """The row of an attempt as it is sent: "Unfinished" until :meth:`record` completes it, so a
        gateway killed mid-request leaves a row behind (closed as "Interrupted" by a later sweep)."""
        self.ledger.record(self._row(call, attempt_id, retry_of, replica, status=UNFINISHED, error_type="Unfinished"))

    def refused(self, call: Call, status: int, error_type: str) -> None:
        """A request turned away before it reached a replica."""
        self.record(call, status, error_type=error_type)

    def record(
        self,
        call: Call,
        status: int,
        *,
        attempt_id: str | None = None,
        retry_of: str | None = None,
        replica: ReplicaState | None = None,
        usage: dict[str, Any] | None = None,
        engine_ms: float = 0.0,
        error_type: str | None = None,
        first_output: float | None = None,
    ) -> None:
        """One ledger row and the metrics of one attempt. ``first_output``: when a stream relayed its
        first chunk (time.monotonic); any other answer reaches its client whole, at the end."""
        usage = usage or {}
        latency_ms = (time.monotonic() - call.started) * 1000
        if first_output is not None:
            ttft_ms: float | None = (first_output - call.started) * 1000
        else:
            ttft_ms = latency_ms if status == 200 else None
        p = call.principal
        prompt = int(usage.get("prompt_tokens") or 0)
        output = int(usage.get("completion_tokens") or 0)
        row = self._row(
            call,
            attempt_id,
            retry_of,
            replica,
            prompt_tokens=prompt,
            output_tokens=output,
            payload_bytes_in=int(usage.get("payload_bytes_in") or 0),
            payload_bytes_out=int(usage.get("payload_bytes_out") or 0),
            activation_bytes=int(usage.get("activation_bytes") or 0),
            engine_ms=engine_ms,
            status=status,
            error_type=error_type,
            latency_ms=latency_ms,
            ttft_ms=ttft_ms,
            queries=call.queries if status == 200 else 0,  # searches made: only an answered attempt made them
        )
        row.charge_su = self._charge(call, row)
        self.ledger.record(row)
        # Token rate limits are debited with the same counts the ledger row gets, once known.
        self.rate_limits.debit_tokens(p, prompt + output)
        self.metrics.observe_attempt(call.endpoint, p.service_class, status, error_type, latency_ms, prompt, output)
        if status == 200:
            self.metrics.observe_answer(p.service_class, latency_ms, ttft_ms, output, engine_ms)
