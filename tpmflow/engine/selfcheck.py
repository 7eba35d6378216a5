"""The probe self-check a replica runs at start, before it joins the pool.

A few short probing requests on the loaded model check invariants that hold for every correct
decoder layout (``tpmflow.engine.layouts``), whatever the family:

- ``resid_post[i] == resid_pre[i+1]`` (the stream leaving a block enters the next one);
- ``resid_pre + attn_out + mlp_out == resid_post`` (the block's composition);
- the logit lens at the last layer equals the model's own next-token distribution;
- a ``Zero`` at ``resid_post[i]`` gives a zero stream into block i+1;
- an ``Add`` of v at ``resid_post[i]`` changes ``resid_pre[i+1]`` by exactly v.

A layout that fails disables probes on the replica (the worker ignores probe specs, the route
refuses them naming the invariant): never wrong numbers. The same requests run on vLLM's
``AsyncLLM`` (the replica) or its offline ``LLM`` (tests), through ``run_self_check`` /
``run_self_check_offline``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from tpmflow.engine.probe import take_probe, take_probe_offline
from tpmflow.engine.sites import ATTN_OUT, MLP_OUT, RESID_POST, RESID_PRE

TOP_K = 5
N_TOKENS = 8


@dataclass(frozen=True)
class SelfCheck:
    """The outcome: ``failed`` names the first invariant that did not hold (None: all held)."""

    failed: str | None
    worst: float  # the largest relative error seen among the invariants that held

    @property
    def ok(self) -> bool:
        return self.failed is None

    def summary(self) -> str:
        return f"self-check passed (worst relative error {self.worst:.1e})" if self.ok else f"{self.failed}"


@dataclass
class Probed:
    """One request's captures (``{(site, layer): [positions, hidden]}``), lens table and the
    engine's own top log-probabilities at the last prompt position."""

    captures: dict[tuple[str, int], np.ndarray]
    lens: list[dict[str, Any]]
    logprobs: dict[int, float]


def prompt_ids(vocab_size: int) -> list[int]:
    """A fixed prompt of ordinary token ids (no tokenizer needed)."""
    return [(3 + 7 * k) % vocab_size for k in range(N_TOKENS)]


def requests(n_layers: int, hidden: int) -> dict[str, dict[str, Any]]:
    """The probe specs of the check (worker format, without ``key``), by name."""
    layers = list(range(n_layers))
    last = n_layers - 1
    out: dict[str, dict[str, Any]] = {
        "base": {
            "captures": [
                {"site": s, "layers": layers, "positions": None, "generated": False}
                for s in (RESID_PRE, RESID_POST, ATTN_OUT, MLP_OUT)
            ],
            "edits": [],
            "lens": {"layers": [last], "top_k": TOP_K, "positions": [N_TOKENS - 1]},
            "n_prompt": N_TOKENS,
        }
    }
    if n_layers < 2:
        return out
    v = np.random.default_rng(0).normal(size=hidden).astype(np.float32)
    probe_next = [{"site": RESID_PRE, "layers": [1], "positions": None, "generated": False}]
    for name, edit in (
        ("zero", {"op": "zero", "site": RESID_POST, "layer": 0, "positions": None}),
        ("add", {"op": "add", "site": RESID_POST, "layer": 0, "positions": None, "values": v.tobytes(),
                 "shape": [hidden], "scale": 1.0}),
    ):  # fmt: skip
        out[name] = {"captures": probe_next, "edits": [edit], "lens": None, "n_prompt": N_TOKENS}
    return out


def add_vector(hidden: int) -> np.ndarray:
    spec = requests(2, hidden)["add"]["edits"][0]
    return np.frombuffer(spec["values"], dtype=np.float32)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-12))


def evaluate(results: dict[str, Probed], n_layers: int, hidden: int, tol: float) -> SelfCheck:
    """Check every invariant on the requests' results; the first that fails is named."""
    worst = 0.0
    base = results["base"].captures

    def holds(error: float, what: str) -> str | None:
        nonlocal worst
        if not np.isfinite(error) or error > tol:
            return f"self-check failed: {what} (relative error {error:.3g} > {tol:g})"
        worst = max(worst, error)
        return None

    checks: list[tuple[float, str]] = []
    for i in range(n_layers):
        if (RESID_PRE, i) not in base or (RESID_POST, i) not in base:
            return SelfCheck(f"self-check failed: no resid_pre/resid_post capture at layer {i}", worst)
        if i + 1 < n_layers:
            checks.append(
                (_rel(base[(RESID_PRE, i + 1)], base[(RESID_POST, i)]), f"resid_post[{i}] == resid_pre[{i + 1}]")
            )
        if (ATTN_OUT, i) in base and (MLP_OUT, i) in base:
            composed = base[(RESID_PRE, i)] + base[(ATTN_OUT, i)] + base[(MLP_OUT, i)]
            checks.append((_rel(composed, base[(RESID_POST, i)]), f"resid_pre + attn_out + mlp_out == resid_post[{i}]"))
    for error, what in checks:
        if (failed := holds(error, what)) is not None:
            return SelfCheck(failed, worst)

    lens, logprobs = results["base"].lens, results["base"].logprobs
    if not lens or not logprobs:
        return SelfCheck("self-check failed: the lens at the last layer gave nothing", worst)
    ids, probs = lens[-1]["token_ids"][-1], lens[-1]["probs"][-1]
    engine = {t: float(np.exp(lp)) for t, lp in logprobs.items()}
    shared = [(p, engine[t]) for t, p in zip(ids, probs, strict=True) if t in engine]
    top = max(engine.values())
    error = max(abs(p - q) for p, q in shared) / top if len(shared) >= min(len(ids), TOP_K) - 1 else float("inf")
    if (failed := holds(error, "the lens at the last layer == the model's own next-token distribution")) is not None:
        return SelfCheck(failed, worst)

    if "zero" in results:
        zeroed = results["zero"].captures[(RESID_PRE, 1)]
        error = float(np.abs(zeroed).max() / max(float(np.abs(base[(RESID_PRE, 1)]).max()), 1e-12))
        if (failed := holds(error, "Zero at resid_post[0] gives a zero stream into block 1")) is not None:
            return SelfCheck(failed, worst)
        moved = results["add"].captures[(RESID_PRE, 1)] - base[(RESID_PRE, 1)]
        v = np.broadcast_to(add_vector(hidden), moved.shape)
        if (failed := holds(_rel(moved, v), "Add of v at resid_post[0] changes resid_pre[1] by v")) is not None:
            return SelfCheck(failed, worst)
    return SelfCheck(None, worst)


def tolerance(dtype: Any) -> float:
    """fp32 sums agree to ~1e-6; half precision rounds each partial sum. A wrong layout is off by O(1)."""
    return 1e-4 if "float32" in str(dtype) else 3e-2


def _probed(found: dict[str, Any] | None, logprobs: dict[int, float]) -> Probed:
    if found is None:
        return Probed({}, [], logprobs)
    captures = {
        (c["site"], int(c["layer"])): np.frombuffer(c["bytes"], dtype=np.float32).reshape(c["shape"])
        for c in found["captures"]
    }
    return Probed(captures, found["lens"], logprobs)


def _params(spec: dict[str, Any], key: str) -> Any:
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=1,
        temperature=0.0,
        logprobs=TOP_K,
        skip_reading_prefix_cache=True,
        extra_args={"tpmflow": {"probe": {**spec, "key": key}}},
    )


def _top(output: Any) -> dict[int, float]:
    first = (output.outputs[0].logprobs or [{}])[0]
    return {int(t): float(lp.logprob) for t, lp in first.items()}


async def run_self_check(engine: Any, info: dict[str, Any]) -> SelfCheck:
    """Run the check on a replica's ``AsyncLLM`` (before the replica serves); disables probes on failure."""
    n_layers, hidden = int(info["num_layers"]), int(info["hidden_size"])
    ids = prompt_ids(int(engine.model_config.get_vocab_size()))
    results: dict[str, Probed] = {}
    for name, spec in requests(n_layers, hidden).items():
        key = f"selfcheck-{name}-{uuid.uuid4().hex[:8]}"
        final = None
        async for out in engine.generate({"prompt_token_ids": ids}, _params(spec, key), key):
            final = out
        results[name] = _probed(await take_probe(engine, key, "", inline=True), _top(final))
    check = evaluate(results, n_layers, hidden, tolerance(engine.model_config.dtype))
    if not check.ok:
        await engine.collective_rpc("tpmflow_set_probes", args=(check.summary(),))
    return check


def run_self_check_offline(llm: Any, info: dict[str, Any]) -> SelfCheck:
    """The same check on vLLM's offline ``LLM`` (tests); disables probes on failure."""
    n_layers, hidden = int(info["num_layers"]), int(info["hidden_size"])
    config = llm.llm_engine.model_config
    ids = prompt_ids(int(config.get_vocab_size()))
    results: dict[str, Probed] = {}
    for name, spec in requests(n_layers, hidden).items():
        key = f"selfcheck-{name}-{uuid.uuid4().hex[:8]}"
        out = llm.generate({"prompt_token_ids": ids}, _params(spec, key), use_tqdm=False)[0]
        results[name] = _probed(take_probe_offline(llm, key), _top(out))
    check = evaluate(results, n_layers, hidden, tolerance(config.dtype))
    if not check.ok:
        llm.collective_rpc("tpmflow_set_probes", args=(check.summary(),))
    return check
