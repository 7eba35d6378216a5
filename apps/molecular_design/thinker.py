"""The steering thinker: Colmena agents that spend a simulation budget where the surrogate points.

One thinker runs one arm of the campaign:

* ``submitter`` keeps ``in_flight`` simulations running, taking the next molecule of the ranking;
* ``receive_simulation`` (topic ``simulate``) records each result and, every ``retrain_every``
  results, wakes the retrainer; when the budget is spent the thinker winds down;
* ``retrain`` fits the surrogate on what has been simulated and ranks the candidates by UCB;
  in the proposing arm it also asks the pool for new molecules (``submit_tpm``: the agent does
  not wait for the model);
* ``receive_proposals`` (topic ``tpm``) validates the model's completions through the SMILES
  adapter's answers and sends the new molecules to be embedded — as a ``tpm_embed`` Colmena task,
  in the same queue as the simulations — and ``receive_embeddings`` (topic ``tpm_tasks``) adds
  them to the candidates.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from colmena.models.results import Result
from colmena.queue.base import ColmenaQueues
from colmena.thinker import agent, event_responder, result_processor

from apps.molecular_design.library import prefixes_of
from apps.molecular_design.surrogate import BootstrapRidge, ucb
from tpmflow.colmena import TPMThinker


@dataclass(frozen=True)
class Arm:
    name: str
    features: Literal["tpm", "fingerprint", "none"]
    proposals: bool
    # Warm start: the arm whose results (same seed, in the campaign's knowledge collection) this
    # one retrieves before it simulates anything; it never simulates those again.
    memory_from: str | None = None


ARMS = (
    Arm("tpm+proposals", "tpm", True),
    Arm("tpm", "tpm", False),
    Arm("fingerprint", "fingerprint", False),
    Arm("random", "none", False),
    Arm("tpm+knowledge", "tpm", True, memory_from="tpm"),
)

#: One pick in this many comes from the model's proposals, while any wait to be simulated.
PROPOSAL_EVERY = 4
#: How long the submitter waits for a batch's ranking before it goes on with the previous one.
RANKING_TIMEOUT_S = 120.0


@dataclass
class Settings:
    budget: int = 64
    in_flight: int = 4
    retrain_every: int = 8
    top_k_prompts: int = 3
    completions: int = 8
    max_tokens: int = 80
    kappa: float = 1.0
    memory: str | None = None  # the knowledge collection every simulated molecule is recorded in
    memory_k: int = 16  # neighbours of each first-batch molecule a warm start retrieves
    context_k: int = 4  # retrieved molecules in the context of each proposal prompt


def _keeps_steering(handler: Callable[[DesignThinker, Result], None]) -> Callable[[DesignThinker, Result], None]:
    """A proposal handler that fails records why and ranks without the proposals: in Colmena a dead
    result processor leaves its topic unread, and the thinker would wait for it forever."""

    @functools.wraps(handler)
    def handle(self: DesignThinker, result: Result) -> None:
        try:
            handler(self, result)
        except Exception as exc:  # noqa: BLE001 - any failure: the campaign goes on without these proposals
            self.logger.exception("handling the model's proposals failed")
            self.tpm_failures.append(f"{type(exc).__name__}: {exc}")
            self._rank()

    return handle


class DesignThinker(TPMThinker):
    """One arm, one seed. ``features`` maps each candidate's SMILES to its surrogate features."""

    def __init__(
        self,
        queues: ColmenaQueues,
        arm: Arm,
        seed: int,
        library: list[str],
        features: dict[str, np.ndarray],
        settings: Settings,
        on_result: Callable[[dict[str, Any]], None],
        **tpm: Any,
    ) -> None:
        super().__init__(queues, **tpm)
        self.arm, self.seed, self.settings, self.on_result = arm, seed, settings, on_result
        self.features = dict(features)
        self.source = dict.fromkeys(library, "library")
        self.rng = np.random.default_rng(seed)
        # The first batch is random and the same for every arm of this seed.
        self.ranking: list[str] = [library[i] for i in np.random.default_rng(seed).permutation(len(library))]
        self.submitted: set[str] = set()
        self.results: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.slots = threading.Semaphore(settings.in_flight)
        self.retrain_needed = threading.Event()
        self.model: BootstrapRidge | None = None
        self.ranked = threading.Condition()  # the submitter waits here for each batch's ranking
        self.ranking_version = 0
        self.tpm_failures: list[str] = []
        self.proposal_rounds = 0
        # completions asked for, valid and new molecules among them, and those embedded as candidates
        self.proposal_counts = {"completions": 0, "new_valid": 0, "candidates": 0}
        self.memory: list[dict[str, Any]] = []  # results retrieved from an earlier campaign (warm start)

    # -- campaign memory ------------------------------------------------------------------------

    def _remember(self, collection: str, item: str, metadata: dict[str, Any]) -> None:
        """Record without ever stopping the campaign: a failed write is noted, not raised (a dead
        result processor would leave the thinker waiting forever)."""
        try:
            self.remember(collection, item, metadata)
        except Exception as exc:  # noqa: BLE001 - the simulation result is kept in the CSV either way
            self.tpm_failures.append(f"memory: {type(exc).__name__}: {exc}")

    def _memory_filter(self) -> dict[str, Any]:
        return {"arm": self.arm.memory_from, "seed": self.seed}

    def _warm_start(self) -> None:
        """Retrieve the earlier campaign's results nearest this campaign's first batch, train the
        surrogate on them and rank: the first batch is chosen by what is known, not at random."""
        assert self.settings.memory is not None
        first = self.ranking[: self.settings.retrain_every]
        hits = self.tpm.knowledge(self.settings.memory).search(
            first, k=self.settings.memory_k, filter=self._memory_filter()
        )
        seen: set[str] = set()
        for hit in (h for row in hits for h in row):
            if hit.item in seen or hit.item not in self.features:
                continue
            seen.add(hit.item)
            objective = hit.metadata.get("objective")
            self.memory.append({"smiles": hit.item, "objective": float("nan") if objective is None else objective})
        with self.lock:
            self.submitted |= seen  # known already: never simulated again
        self._fit([])
        self._rank()

    # -- agents ---------------------------------------------------------------------------------

    @agent
    def submitter(self) -> None:
        """Batch k+1 is chosen by the surrogate trained on batches 1..k (and, in the proposing
        arm, among the model's proposals of that round), so every arm gets the same number of
        decisions for its budget however fast the simulations or the model are."""
        if self.arm.memory_from is not None:
            try:
                self._warm_start()
            except Exception as exc:  # noqa: BLE001 - no memory: the campaign goes on cold, and says so
                self.logger.exception("the warm start failed; starting cold")
                self.tpm_failures.append(f"warm start: {type(exc).__name__}: {exc}")
        for start in range(0, self.settings.budget, self.settings.retrain_every):
            batch = start // self.settings.retrain_every
            if self.arm.features != "none":
                with self.ranked:
                    if not self.ranked.wait_for(lambda b=batch: self.ranking_version >= b, timeout=RANKING_TIMEOUT_S):
                        self.logger.warning(f"no new ranking after {RANKING_TIMEOUT_S} s; using the previous one")
            for _ in range(min(self.settings.retrain_every, self.settings.budget - start)):
                self.slots.acquire()
                with self.lock:
                    smiles = next((s for s in self.ranking if s not in self.submitted), None)
                    if smiles is None:
                        return
                    self.submitted.add(smiles)
                    info = {"arm": self.arm.name, "seed": self.seed, "smiles": smiles, "source": self.source[smiles]}
                self.queues.send_inputs(smiles, self.seed, method="simulate", topic="simulate", task_info=info)

    @result_processor(topic="simulate")
    def receive_simulation(self, result: Result) -> None:
        self.slots.release()
        row = dict(result.task_info)
        if result.success:
            row.update(result.value)
        else:  # the task itself failed (worker lost, exception): recorded, never dropped
            row.update(objective=float("nan"), error=f"task failed: {result.failure_info.exception[:200]}")
        row["index"] = len(self.results)
        row["worker"] = (result.worker_info.hostname if result.worker_info else "") or ""
        row["task_seconds"] = round(result.time.running or 0.0, 4)
        with self.lock:
            self.results.append(row)
            done = len(self.results)
        self.on_result(row)
        if self.settings.memory is not None:  # every simulation becomes campaign memory, without waiting
            objective = row.get("objective")
            finite = isinstance(objective, float | int) and np.isfinite(objective)
            self._remember(
                self.settings.memory,
                row["smiles"],
                {
                    "arm": self.arm.name,
                    "seed": self.seed,
                    "objective": objective if finite else None,
                    "source": row["source"],
                },
            )
        if self.arm.features != "none" and done % self.settings.retrain_every == 0 and done < self.settings.budget:
            self.retrain_needed.set()

    @event_responder(event_name="retrain_needed")
    def retrain(self) -> None:
        with self.lock:
            tried = list(self.results)
        known = self._fit(tried)
        if self.arm.proposals and known:
            self._propose(known)  # ranked once the proposals are embedded (or refused)
        else:
            self._rank()

    def _fit(self, tried: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Fit the surrogate on this campaign's results and any retrieved from memory; returns the
        results with a finite objective."""
        tried = self.memory + tried
        known = [r for r in tried if np.isfinite(r.get("objective", np.nan))]
        if known:
            # A failed simulation counts as the worst result seen, so the surrogate learns to avoid
            # molecules like it (no MMFF94 parameters, no conformer) instead of choosing them again.
            worst = min(r["objective"] for r in known)
            y = np.array([r["objective"] if np.isfinite(r.get("objective", np.nan)) else worst for r in tried])
            self.model = BootstrapRidge(seed=int(self.rng.integers(1 << 31))).fit(
                np.stack([self.features[r["smiles"]] for r in tried]), y
            )
        return known

    def _rank(self) -> None:
        """Order the candidates not yet simulated by UCB; one pick in PROPOSAL_EVERY is a proposal."""
        with self.lock:
            candidates = [s for s in self.source if s not in self.submitted]
        if self.model is not None and candidates:
            mean, std = self.model.predict(np.stack([self.features[s] for s in candidates]))
            order = [candidates[i] for i in np.argsort(-ucb(mean, std, kappa=self.settings.kappa))]
            library = [s for s in order if self.source[s] == "library"]
            proposed = [s for s in order if self.source[s] == "proposed"]
            ranking: list[str] = []
            while library or proposed:
                take_proposal = proposed and (len(ranking) % PROPOSAL_EVERY == PROPOSAL_EVERY - 1 or not library)
                ranking.append((proposed if take_proposal else library).pop(0))
            with self.lock:
                self.ranking = ranking
        with self.ranked:
            self.ranking_version += 1
            self.ranked.notify_all()

    def _propose(self, known: list[dict[str, Any]]) -> None:
        best = sorted(known, key=lambda r: -r["objective"])[: self.settings.top_k_prompts]
        prompts = sorted({p for r in best for p in prefixes_of(r["smiles"])})
        self.proposal_rounds += 1
        extra: dict[str, Any] = {}
        if self.arm.memory_from is not None and self.settings.memory is not None:
            # Each prompt after the remembered molecules nearest the best one (the demo model knows
            # only SMILES: molecules without their property text).
            extra = {
                "retrieve": {
                    "collection": self.settings.memory,
                    "k": self.settings.context_k,
                    "query": [best[0]["smiles"]],
                    "filter": self._memory_filter(),
                },
                "adapter_config": {"context_properties": False},
            }
        self.submit_tpm(
            "generate",
            prompts,
            adapter="smiles",
            n=self.settings.completions,
            max_tokens=self.settings.max_tokens,
            temperature=1.0,
            seed=self.seed * 1000 + self.proposal_rounds,
            topic="tpm",
            task_info={"prompts": prompts},
            **extra,
        )

    @result_processor(topic="tpm")
    @_keeps_steering
    def receive_proposals(self, result: Result) -> None:
        if not result.success:
            self.tpm_failures.append(result.failure_info.exception)
            self._rank()
            return
        new: list[str] = []
        for per_prompt in result.value:
            for decoded in per_prompt if isinstance(per_prompt, list) else []:
                self.proposal_counts["completions"] += 1
                smiles = decoded.value
                if smiles and smiles not in self.source and smiles not in new:
                    new.append(smiles)
        self.proposal_counts["new_valid"] += len(new)
        if not new:
            self._rank()
            return
        # Embedded by a Colmena task, in the same queue as the simulations.
        self.queues.send_inputs(
            new, method="tpm_embed", input_kwargs={"adapter": "smiles"}, topic="tpm_tasks", task_info={"smiles": new}
        )

    @result_processor(topic="tpm_tasks")
    @_keeps_steering
    def receive_embeddings(self, result: Result) -> None:
        if not result.success:
            self.tpm_failures.append(result.failure_info.exception)
            self._rank()
            return
        new, emb = result.task_info["smiles"], result.value
        if not emb.ok:  # the adapter refused every proposal: rank without them
            self._rank()
            return
        vectors = emb.numpy(only_ok=True)  # rows for the items the adapter accepted, in emb.ok order
        with self.lock:
            for row, item in enumerate(emb.ok):
                smiles = new[item]
                if smiles not in self.source:
                    self.features[smiles] = vectors[row]
                    self.source[smiles] = "proposed"
                    self.proposal_counts["candidates"] += 1
        self._rank()
