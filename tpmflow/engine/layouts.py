"""The one table of decoder layouts: how each hook site is read and written, per vLLM model class.

Hooks never guess. A model class that is not in ``LAYOUTS`` gets no probe hooks (the replica still
serves everything else), and a class that is gets a self-check at replica start
(``tpmflow.engine.selfcheck``) before any probe is answered. Attribute names alone cannot tell
layouts apart: vLLM's ``StablelmDecoderLayer`` has Llama's attribute names but returns the full
stream, not Llama's fused ``(hidden, residual)`` pair, so reading it as fused counts the residual twice.

Compositions (how a block's output is built from its parts; the self-check verifies
``resid_pre + attn_out + mlp_out == resid_post`` for every one of them):

- ``fused``: layers take ``(positions, hidden, residual)`` and return ``(hidden, residual)``; the
  stream at the block's input and output is ``hidden + residual`` (vLLM's fused add-RMSNorm).
- ``stream``: layers take the stream (argument ``hidden_arg``) and return it (``output[0]`` when
  they return a tuple).
- ``parallel``: as ``stream``, but attention and MLP both read the block's input (GPT-NeoX, Falcon).

Torch-free, like ``tpmflow.engine.sites``, so the table can be listed anywhere (README, doctor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tpmflow.engine.sites import SITES, Part

Composition = Literal["fused", "stream", "parallel"]


@dataclass(frozen=True)
class Layout:
    """Where a decoder's parts are in vLLM's module tree, and how its stream is composed."""

    family: str
    decoder: str  # dotted path from vLLM's model to the decoder stack ("model", "transformer", "model.decoder")
    layers: str  # the decoder's list of blocks
    norm: str  # the decoder's final norm (the lens applies it, then the model's own ``compute_logits``)
    attn: str  # the block's attention: its output is hook_attn_out
    mlp: str  # the block's MLP (for MoE blocks: the experts' combined output): hook_mlp_out
    out_proj: str  # the attention's output projection: its input is hook_z
    composition: Composition
    hidden_arg: int = 1  # where the hidden states are among the block's positional arguments

    def decoder_of(self, model: Any) -> Any:
        obj = model
        for name in self.decoder.split("."):
            obj = getattr(obj, name)
        return obj

    def part(self, layer: Any, part: Part) -> Any | None:
        """The module of block ``layer`` a site's ``part`` is read at (None where this block has none)."""
        if part in ("block_in", "block_out"):
            return layer
        attn = getattr(layer, self.attn, None)
        if part == "attn":
            return attn
        if part == "mlp":
            return getattr(layer, self.mlp, None)
        if part == "out_proj_in":
            return getattr(attn, self.out_proj, None)
        raise ValueError(f"unknown part {part!r}")

    @property
    def fused(self) -> bool:
        return self.composition == "fused"

    def block_inputs(self, args: Any, kwargs: Any) -> tuple[Any, Any]:
        """(hidden, residual) entering a block; the stream is their sum (residual None: hidden alone).
        vLLM passes the first fused layer a residual of None: the stream is then hidden alone."""
        hidden = args[self.hidden_arg] if len(args) > self.hidden_arg else kwargs["hidden_states"]
        if self.fused:
            return hidden, args[self.hidden_arg + 1] if len(args) > self.hidden_arg + 1 else kwargs.get("residual")
        return hidden, None

    def block_outputs(self, output: Any) -> tuple[Any, Any]:
        """(hidden, residual) leaving a block, whose sum is the stream (residual None: hidden alone)."""
        if self.fused:
            return output[0], output[1]
        return (output[0] if isinstance(output, tuple) else output), None


_LLAMA = dict(decoder="model", layers="layers", norm="norm", attn="self_attn", mlp="mlp", out_proj="o_proj")

# Keyed by the class vLLM actually loads (``type(model_runner.model).__name__``), not the config's
# ``architectures``: vLLM maps several names to one class, and runs some families on its
# Transformers backend, whose module tree is different.
LAYOUTS: dict[str, Layout] = {
    "LlamaForCausalLM": Layout("Llama", composition="fused", **_LLAMA),
    "MistralForCausalLM": Layout("Mistral", composition="fused", **_LLAMA),
    "Qwen2ForCausalLM": Layout("Qwen2", composition="fused", **_LLAMA),
    "Qwen3ForCausalLM": Layout("Qwen3", composition="fused", **_LLAMA),
    "GemmaForCausalLM": Layout("Gemma", composition="fused", **_LLAMA),
    # StableLM: Llama's names, but the block returns (stream, mid-block residual) and takes the stream.
    "StablelmForCausalLM": Layout("StableLM", composition="stream", **_LLAMA),
    "GPT2LMHeadModel": Layout(
        "GPT-2", "transformer", "h", "ln_f", "attn", "mlp", "c_proj", composition="stream", hidden_arg=0
    ),
    # OPT has no MLP module: fc2's output (before the residual add) is the MLP's output.
    "OPTForCausalLM": Layout(
        "OPT", "model.decoder", "layers", "final_layer_norm", "self_attn", "fc2", "out_proj", "stream", hidden_arg=0
    ),
    # Mixtral: the MoE block (router + experts) is the MLP; its output is the experts' combined output.
    "MixtralForCausalLM": Layout(
        "Mixtral", "model", "layers", "norm", "self_attn", "block_sparse_moe", "o_proj", composition="fused"
    ),
}

SUPPORTED = tuple(LAYOUTS)
assert all(s.part in ("block_in", "block_out", "attn", "mlp", "out_proj_in") for s in SITES.values())


def layout_for(model_class: str) -> Layout | None:
    """The layout of a vLLM model class, or None: probes are then refused, never guessed."""
    return LAYOUTS.get(model_class)


def unsupported_message(model_class: str, architectures: list[str] | None = None) -> str:
    """What a probe to a replica without a layout is told: the class vLLM loaded, and what is supported."""
    arch = f" (config architectures {architectures})" if architectures else ""
    return (
        f"probes are not available for this model: vLLM loaded it as {model_class}{arch}, which tpmflow's "
        f"layout table does not cover; probes support {', '.join(SUPPORTED)}. Generation, chat and "
        "embeddings are served as usual."
    )
