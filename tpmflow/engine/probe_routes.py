"""The replica's probe route: intermediary access to the forward pass (see ``tpmflow.engine.probe``).

Every spec is validated here — sites, layers, positions, vector sizes, NaN/inf, the activation
bytes it would produce — before anything reaches the engine. Captures come back as arrays inline
or, when big, as references the worker wrote straight into the pool's store (signed here).
Sites come from the one table in ``tpmflow.engine.sites``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import numpy as np

from tpmflow.engine.context import ReplicaContext
from tpmflow.engine.ops import engine_prompt, prompt_tokens, run_request
from tpmflow.engine.probe import take_probe
from tpmflow.engine.sites import LENS_SITE, SITES, split_site
from tpmflow.errors import InvalidRequest
from tpmflow.payload import Reference
from tpmflow.schema import (
    Add,
    CapturedArray,
    InlineArray,
    LensLayer,
    ProbeRequest,
    ProbeResponse,
    Replace,
    Usage,
)


def _site(site: str, layer: int | None, n_layers: int, what: str) -> tuple[str, int | None]:
    try:
        name, named_layer = split_site(site)
    except ValueError as exc:
        raise InvalidRequest(f"{what}: {exc}") from None
    if named_layer is not None and layer is not None and named_layer != layer:
        raise InvalidRequest(f"{what}: site {site!r} names layer {named_layer}, but layer={layer}")
    chosen = named_layer if named_layer is not None else layer
    if chosen is not None and not 0 <= chosen < n_layers:
        raise InvalidRequest(
            f"{what}: layer {chosen} is out of range; the model has {n_layers} layers (0..{n_layers - 1})"
        )
    return name, chosen


def _positions(positions: list[int] | None, limit: int, what: str, keep_order: bool = False) -> list[int] | None:
    """Checked positions: sorted for captures; in the caller's order for edits, whose value rows
    follow that order (so duplicates are refused there)."""
    if positions is None:
        return None
    bad = [p for p in positions if not 0 <= p < limit]
    if bad:
        raise InvalidRequest(f"{what}: positions {bad[:5]} are beyond the sequence (0..{limit - 1})")
    if keep_order:
        if len(set(positions)) != len(positions):
            raise InvalidRequest(f"{what}: positions repeat; give each position once")
        return list(positions)
    return sorted(set(positions))


def build_spec(ctx: ReplicaContext, body: ProbeRequest, principal: str, n_prompt: int) -> tuple[dict[str, Any], int]:
    """The worker's JSON spec, and the activation bytes it may produce (checked against the limit)."""
    n_layers, hidden = ctx.num_layers, ctx.hidden_size
    limit = n_prompt + body.max_tokens - 1  # the last generated token is never fed back through the model
    captures: list[dict[str, Any]] = []
    expected = 0
    for k, c in enumerate(body.captures):
        what = f"captures[{k}]"
        site, layer = _site(c.site, None, n_layers, what)
        if layer is not None and c.layers is not None and c.layers != [layer]:
            raise InvalidRequest(f"{what}: site {c.site!r} names its layer; drop layers={c.layers}")
        layers = [layer] if layer is not None else (c.layers if c.layers is not None else list(range(n_layers)))
        for x in layers:
            _site(site, x, n_layers, what)
        positions = _positions(c.positions, limit, what)
        n_pos = len(positions) if positions is not None else n_prompt + (body.max_tokens if c.generated else 0)
        width = ctx.num_heads * ctx.head_dim if SITES[site].per_head else hidden
        expected += n_pos * width * 4 * len(layers)
        captures.append({"site": site, "layers": layers, "positions": positions, "generated": c.generated})
    edits: list[dict[str, Any]] = []
    edit_bytes = 0
    for k, e in enumerate(body.interventions):
        what = f"interventions[{k}] ({e.op})"
        site, layer = _site(e.site, e.layer, n_layers, what)
        if layer is None:
            raise InvalidRequest(f"{what}: name the layer (layer=L or site='blocks.L.{site}')")
        if not SITES[site].editable:
            raise InvalidRequest(f"{what}: {site} can be captured, not edited; edit {SITES[site].edit_instead} instead")
        positions = _positions(e.positions, limit, what, keep_order=True)
        spec: dict[str, Any] = {"op": e.op, "site": site, "layer": layer, "positions": positions}
        if isinstance(e, (Add, Replace)):
            payload = e.vector if isinstance(e, Add) else e.values
            values, _ = ctx.resolve_array(payload, principal)
            values = np.asarray(values)
            if values.dtype.kind != "f":
                raise InvalidRequest(f"{what}: values must be floating point numbers, got {values.dtype}")
            with np.errstate(over="ignore", invalid="ignore"):
                applied = values.astype(np.float32) * np.float32(e.scale if isinstance(e, Add) else 1.0)
            if not np.isfinite(applied).all():
                raise InvalidRequest(f"{what}: values (times scale) must be finite: no NaN or inf")
            edit_bytes += applied.nbytes
            rows_ok = values.ndim == 1 or (
                isinstance(e, Replace) and values.ndim == 2 and positions is not None and len(values) == len(positions)
            )
            if not rows_ok or values.shape[-1] != hidden:
                raise InvalidRequest(
                    f"{what}: expected a vector of the hidden size {hidden}"
                    + (" (or one row per position)" if isinstance(e, Replace) else "")
                    + f", got shape {list(values.shape)}"
                )
            values = np.ascontiguousarray(values, dtype=np.float32)
            spec.update({"values": values.tobytes(), "shape": list(values.shape)})
            if isinstance(e, Add):
                spec["scale"] = e.scale
        edits.append(spec)
    lens = None
    if body.lens is not None:
        layers = body.lens.layers if body.lens.layers is not None else list(range(n_layers))
        for x in layers:
            _site(LENS_SITE, x, n_layers, "lens")
        if body.lens.top_k > ctx.vocab_size:
            raise InvalidRequest(f"lens: top_k {body.lens.top_k} exceeds the vocabulary of {ctx.vocab_size}")
        positions = _positions(body.lens.positions, limit, "lens")
        n_pos = len(positions) if positions is not None else n_prompt
        expected += n_pos * len(layers) * body.lens.top_k * 8  # token id + probability per entry
        if ctx.pipeline_parallel > 1:
            # Layers on stages without the final norm send their stream to the last stage to be
            # unembedded: hidden-size rows per position, counted against the limit too (a bound
            # from above: all but the last stage's share of the layers).
            earlier = sum(1 for x in layers if x < n_layers - n_layers // ctx.pipeline_parallel)
            expected += n_pos * earlier * ctx.hidden_size * 4
        lens = {"layers": layers, "top_k": body.lens.top_k, "positions": positions}
    max_bytes = ctx.settings.max_activation_bytes
    if expected > max_bytes:
        raise InvalidRequest(
            f"the captures and lens asked for would produce {expected} bytes; the limit is {max_bytes} "
            "(capture fewer layers or positions)"
        )
    if edit_bytes > max_bytes:
        raise InvalidRequest(f"the interventions carry {edit_bytes} bytes of values; the limit is {max_bytes}")
    return {"captures": captures, "edits": edits, "lens": lens, "n_prompt": n_prompt}, expected


def _lens_table(tokenizer: Any, entries: list[dict[str, Any]]) -> list[LensLayer]:
    """The lens rows with their tokens as text (each distinct id decoded once)."""
    distinct = {t for e in entries for row in e["token_ids"] for t in row}
    text = {t: tokenizer.decode([t]) for t in distinct}
    return [
        LensLayer(
            layer=e["layer"],
            positions=e["positions"],
            token_ids=e["token_ids"],
            probs=e["probs"],
            tokens=[[text[t] for t in row] for row in e["token_ids"]],
        )
        for e in entries
    ]


async def probe(
    ctx: ReplicaContext, body: ProbeRequest, principal: str, request_id: str, priority: int, salt: str | None
) -> ProbeResponse:
    """Run one prompt with captures, interventions and the logit lens; no code travels."""
    from vllm import SamplingParams

    started = time.time()
    ctx.check_model(body.model)
    if ctx.probe_error:
        raise InvalidRequest(ctx.probe_error)
    tokenizer = ctx.engine.get_tokenizer()
    ids = prompt_tokens(ctx, tokenizer, 0, body.prompt)
    if len(ids) + body.max_tokens > ctx.max_model_len:
        raise InvalidRequest(f"{len(ids)} prompt tokens + max_tokens {body.max_tokens} exceed max_model_len")
    spec, _ = await asyncio.to_thread(build_spec, ctx, body, principal, len(ids))
    key = f"{request_id}:probe:{uuid.uuid4().hex[:8]}"
    spec["key"] = key
    # Reading the prefix cache is skipped (a cached prefix is never recomputed, so hooks would miss
    # it), and a salt of its own keeps this request's (possibly edited) KV blocks from ever being
    # reused by another request.
    params = SamplingParams(
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        seed=body.seed,
        skip_reading_prefix_cache=True,
        extra_args={"tpmflow": {"probe": spec}},
    )
    try:
        final = await run_request(ctx.engine, engine_prompt(ids, f"probe-{key}"), params, request_id, priority)
    finally:
        found = await take_probe(ctx.engine, key, principal)
    if found is None:
        raise RuntimeError("the probe hooks did not fire (is the model compiled? tpmflow needs --enforce-eager)")
    captures: list[CapturedArray] = []
    activation_bytes = 0
    for cap in found["captures"]:
        activation_bytes += int(cap["nbytes"])
        if "reference" in cap:
            payload: InlineArray | Reference = ctx.signer.sign(Reference.model_validate(cap["reference"]))
        else:
            payload = InlineArray.from_numpy(np.frombuffer(cap["bytes"], dtype=np.float32).reshape(cap["shape"]))
        captures.append(CapturedArray(site=cap["site"], layer=cap["layer"], positions=cap["positions"], array=payload))
    lens = await asyncio.to_thread(_lens_table, tokenizer, found["lens"])
    out = final.outputs[0]
    usage = Usage(prompt_tokens=len(ids), completion_tokens=len(out.token_ids), activation_bytes=activation_bytes)
    sampling = body.model_dump(exclude={"prompt", "model", "interventions"})
    sampling["interventions"] = [{"op": e.op, "site": e.site, "layer": e.layer} for e in body.interventions]
    return ProbeResponse(
        text=out.text,
        prompt_tokens=list(tokenizer.convert_ids_to_tokens(ids)),
        captures=captures,
        lens=lens,
        steps=found["steps"],
        usage=usage,
        provenance=ctx.provenance(request_id, sampling, started),
    )
