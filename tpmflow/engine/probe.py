"""Intermediary access inside vLLM's workers: capture, add, replace and zero activations, and the
logit lens, per request, inside continuously batched steps.

Requests opt in through ``SamplingParams.extra_args["tpmflow"]["probe"]``: plain JSON (vectors as
float32 bytes), never code. In every step the hooks slice each probing request's rows out of the
flat token batch and apply that request's specs only; other requests in the same batch are
untouched. Sites (TransformerLens's names for block ``L``) are those of the one table in
``tpmflow.engine.sites``; at a residual-stream site vLLM's fused layers carry ``(hidden, residual)``,
whose sum the stream is.

What is captured is copied at once: vLLM's fused add-RMSNorm overwrites hidden and residual in place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tpmflow.errors import StoreUnavailable


@dataclass
class Edit:
    op: str  # add | replace | zero
    positions: list[int] | None  # None: every position, generated ones included
    values: np.ndarray | None  # add: [hidden] (scaled); replace: [hidden] or [len(positions), hidden]

    def rows_for(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Which rows (of this request's slice, at absolute positions ``pos``) the edit touches, and
        the value rows for them (replace with one row per position)."""
        if self.positions is None:
            return np.arange(len(pos)), self.values
        wanted = {p: j for j, p in enumerate(self.positions)}
        rows = np.array([r for r, p in enumerate(pos) if int(p) in wanted], dtype=np.int64)
        if self.op == "replace" and self.values is not None and self.values.ndim == 2:
            return rows, self.values[[wanted[int(pos[r])] for r in rows]]
        return rows, self.values


@dataclass
class ProbeState:
    """One request's specs and what it has captured so far (rows by absolute position)."""

    key: str
    n_prompt: int
    captures: dict[tuple[str, int], tuple[set[int] | None, bool]]  # (site, layer) -> (positions, generated)
    edits: dict[tuple[str, int], list[Edit]]
    lens_layers: set[int]
    top_k: int
    lens_positions: set[int] | None = None
    rows: dict[tuple[str, int], dict[int, np.ndarray]] = field(default_factory=dict)
    lens: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    # The stream at lens layers of a pipeline stage without the final norm: unembedded by the last stage.
    lens_streams: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)
    created: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)  # the last step it took part in
    steps: list[int] = field(default_factory=list)  # engine steps this request took part in

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ProbeState:
        captures: dict[tuple[str, int], tuple[set[int] | None, bool]] = {}
        for c in spec.get("captures", []):
            positions = None if c.get("positions") is None else {int(p) for p in c["positions"]}
            for layer in c["layers"]:
                captures[(c["site"], int(layer))] = (positions, bool(c.get("generated", False)))
        edits: dict[tuple[str, int], list[Edit]] = {}
        for e in spec.get("edits", []):
            values = None
            if e.get("values") is not None:
                values = np.frombuffer(e["values"], dtype=np.float32).reshape(e["shape"]).copy()
                if e["op"] == "add":
                    values = values * float(e.get("scale", 1.0))
            edits.setdefault((e["site"], int(e["layer"])), []).append(
                Edit(e["op"], None if e.get("positions") is None else [int(p) for p in e["positions"]], values)
            )
        lens = spec.get("lens") or {}
        return cls(
            key=str(spec["key"]),
            n_prompt=int(spec.get("n_prompt", 0)),
            captures=captures,
            edits=edits,
            lens_layers={int(x) for x in lens.get("layers", [])},
            top_k=int(lens.get("top_k", 5)),
            lens_positions=None if lens.get("positions") is None else {int(p) for p in lens["positions"]},
        )

    def wants(self, site: str, layer: int) -> bool:
        return (site, layer) in self.captures or (site, layer) in self.edits

    def capture(self, site: str, layer: int, pos: np.ndarray, values: np.ndarray) -> None:
        spec = self.captures.get((site, layer))
        if spec is None:
            return
        positions, generated = spec
        store = self.rows.setdefault((site, layer), {})
        for r, p in enumerate(pos):
            p = int(p)
            if (positions is None and (p < self.n_prompt or generated)) or (positions is not None and p in positions):
                store[p] = values[r].copy()

    def keep_lens_stream(self, layer: int, pos: np.ndarray, stream: np.ndarray) -> None:
        """Keep the stream rows the lens wants at ``layer`` (on a stage that cannot unembed them)."""
        for r, p in enumerate(pos):
            if self.lens_positions is None or int(p) in self.lens_positions:
                self.lens_streams.setdefault(layer, {})[int(p)] = stream[r].copy()

    def results(self) -> dict[str, Any]:
        """Captured arrays (float32 bytes, positions), the lens table and the streams kept for a
        later stage's lens (``lens_streams``), for ``tpmflow_take_probe``."""
        out: dict[str, Any] = {
            "captures": [], "lens": [], "steps": self.steps, "lens_streams": [], "top_k": self.top_k
        }  # fmt: skip
        for layer, by_pos in sorted(self.lens_streams.items()):
            positions = sorted(by_pos)
            rows = np.stack([by_pos[p] for p in positions]).astype(np.float32)
            out["lens_streams"].append(
                {"layer": layer, "positions": positions, "bytes": rows.tobytes(), "shape": list(rows.shape)}
            )
        for (site, layer), by_pos in sorted(self.rows.items()):
            positions = sorted(by_pos)
            array = np.stack([by_pos[p] for p in positions]).astype(np.float32) if positions else np.zeros((0,))
            out["captures"].append({"site": site, "layer": layer, "positions": positions, "array": array})
        for layer, top_by_pos in sorted(self.lens.items()):
            positions = sorted(top_by_pos)
            out["lens"].append(
                {
                    "layer": layer,
                    "positions": positions,
                    "token_ids": [top_by_pos[p][0].tolist() for p in positions],
                    "probs": [top_by_pos[p][1].tolist() for p in positions],
                }
            )
        return out


def merge_worker_results(results: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """One request's ``tpmflow_take_probe`` results from every worker of a replica, as one: each
    pipeline stage holds its own layers' captures and lens (tensor rank 0 of each records; other
    ranks hold nothing). None when no worker saw the request."""
    found = [r[key] for r in results if r.get(key) is not None]
    if not found:
        return None
    merged: dict[str, Any] = {
        "captures": [], "lens": [], "lens_streams": [], "steps": found[0]["steps"], "top_k": found[0]["top_k"]
    }  # fmt: skip
    for part in found:
        for name in ("captures", "lens", "lens_streams"):
            merged[name].extend(part.get(name, []))
    merged["captures"].sort(key=lambda c: (c["site"], c["layer"]))
    merged["lens"].sort(key=lambda e: e["layer"])
    return merged


def add_deferred_lens(found: dict[str, Any], tables: list[list[dict[str, Any]] | None]) -> dict[str, Any]:
    """``found`` with the lens entries the last pipeline stage computed (``tpmflow_lens_of``)."""
    entries = [e for table in tables if table for e in table]
    found["lens"] = sorted(found["lens"] + entries, key=lambda e: e["layer"])
    found["lens_streams"] = []
    return found


async def take_probe(engine: Any, key: str, principal: str, inline: bool = False) -> dict[str, Any] | None:
    """Hand over one probing request's results from every worker of a replica (``AsyncLLM``), merged,
    with the lens of earlier pipeline stages' layers computed by the last stage."""
    found = merge_worker_results(
        await engine.collective_rpc("tpmflow_take_probe", args=([key], principal, inline)), key
    )
    refused = [c["store_error"] for c in (found or {}).get("captures", []) if "store_error" in c]
    if refused:
        raise StoreUnavailable(
            f"the pool's payload store refused {len(refused)} capture(s) of this probe ({refused[0]}; the "
            "replica's log has the details): retry once the store is back"
        )
    if found is not None and found["lens_streams"]:
        add_deferred_lens(
            found, await engine.collective_rpc("tpmflow_lens_of", args=(found["lens_streams"], found["top_k"]))
        )
    return found


def take_probe_offline(llm: Any, key: str) -> dict[str, Any] | None:
    """``take_probe`` on vLLM's offline ``LLM`` (tests, the offline self-check): inline arrays."""
    found = merge_worker_results(llm.collective_rpc("tpmflow_take_probe", args=([key], "", True)), key)
    if found is not None and found["lens_streams"]:
        add_deferred_lens(found, llm.collective_rpc("tpmflow_lens_of", args=(found["lens_streams"], found["top_k"])))
    return found


@dataclass
class StepRow:
    """One probing request's slice of the flat batch in the current step."""

    state: ProbeState
    lo: int
    hi: int
    positions: np.ndarray  # absolute positions of rows lo..hi


def apply_edits(edits: list[Edit], rows: StepRow, tensor: Any, residual: Any = None) -> None:
    """Edit ``tensor`` in place at this request's rows so that ``tensor (+ residual)`` — the stream
    at the site — is changed as asked (``replace`` sets the sum, so it subtracts the residual)."""
    import torch

    for edit in edits:
        local, values = edit.rows_for(rows.positions)
        if len(local) == 0:
            continue
        idx = torch.from_numpy(local + rows.lo).to(tensor.device)
        if edit.op == "zero":
            target = torch.zeros_like(tensor[idx])
            if residual is not None:
                target = target - residual[idx]
            tensor[idx] = target
            continue
        v = torch.from_numpy(np.ascontiguousarray(values)).to(tensor.device, tensor.dtype)
        if edit.op == "add":
            tensor[idx] = tensor[idx] + v
        else:  # replace
            target = v.expand(len(local), -1) if v.ndim == 1 else v
            if residual is not None:
                target = target - residual[idx]
            tensor[idx] = target
