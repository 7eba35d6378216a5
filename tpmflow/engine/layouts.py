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
- ``parallel``: as ``stream``, but attention and MLP both read the block's input (GPT-NeoX, Phi,
  Falcon); the block's output is still input + attention + MLP.

Two details some classes add: ``batched`` (vLLM's Transformers backend runs the Hugging Face model
with a batch dimension of one, ``[1, tokens, hidden]``, where vLLM's own classes use
``[tokens, hidden]``) and ``bias_apart`` (attention and MLP return ``(output, bias)`` and the block
adds the bias itself, as vLLM's Falcon does: the site's value is their sum).

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
    batched: bool = False  # tensors are [1, tokens, hidden] (vLLM's Transformers backend)
    bias_apart: bool = False  # attention and MLP return (output, bias), the block adds the bias
    # Where the block normalises a part's output before adding it to the stream (Gemma2's
    # post-attention and post-feedforward norms), the site is that norm's output: what the stream gets.
    attn_site: str | None = None  # the module whose output is hook_attn_out (None: ``attn``)
    mlp_site: str | None = None  # the module whose output is hook_mlp_out (None: ``mlp``)

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
            return getattr(layer, self.attn_site, None) if self.attn_site else attn
        if part == "mlp":
            return getattr(layer, self.mlp_site or self.mlp, None)
        if part == "out_proj_in":
            return getattr(attn, self.out_proj, None)
        raise ValueError(f"unknown part {part!r}")

    @property
    def fused(self) -> bool:
        return self.composition == "fused"

    def tokens(self, tensor: Any) -> Any:
        """``tensor`` as [tokens, ...]: a view (in-place edits reach the model's own tensor)."""
        return tensor[0] if self.batched else tensor

    def block_inputs(self, args: Any, kwargs: Any) -> tuple[Any, Any]:
        """(hidden, residual) entering a block; the stream is their sum (residual None: hidden alone).
        vLLM passes the first fused layer a residual of None: the stream is then hidden alone."""
        hidden = args[self.hidden_arg] if len(args) > self.hidden_arg else kwargs["hidden_states"]
        if self.fused:
            return hidden, args[self.hidden_arg + 1] if len(args) > self.hidden_arg + 1 else kwargs.get("residual")
        return self.tokens(hidden), None

    def block_outputs(self, output: Any) -> tuple[Any, Any]:
        """(hidden, residual) leaving a block, whose sum is the stream (residual None: hidden alone)."""
        if self.fused:
            return output[0], output[1]
        return self.tokens(output[0] if isinstance(output, tuple) else output), None

    def module_output(self, output: Any) -> tuple[Any, Any]:
        """(output, bias) of an attention or MLP module: the site's value is output + bias (bias
        None: the output alone). Other tuples are (output, something else: a parallel linear's
        unused bias slot, attention weights): the output alone."""
        if not isinstance(output, tuple):
            return self.tokens(output), None
        bias = output[1] if self.bias_apart and len(output) > 1 else None
        return self.tokens(output[0]), bias


_LLAMA = dict(decoder="model", layers="layers", norm="norm", attn="self_attn", mlp="mlp", out_proj="o_proj")


def transformers_backend(architecture: str) -> str:
    """The table's key for a family vLLM runs on its Transformers backend (one vLLM class for all
    of them: the Hugging Face architecture tells their module trees apart)."""
    return f"TransformersForCausalLM[{architecture}]"


# Keyed by the class vLLM actually loads (``type(model_runner.model).__name__``), not the config's
# ``architectures``: vLLM maps several names to one class, and runs some families on its
# Transformers backend, whose module tree is different.
LAYOUTS: dict[str, Layout] = {
    "LlamaForCausalLM": Layout("Llama", composition="fused", **_LLAMA),
    "MistralForCausalLM": Layout("Mistral", composition="fused", **_LLAMA),
    "Qwen2ForCausalLM": Layout("Qwen2", composition="fused", **_LLAMA),
    "Qwen3ForCausalLM": Layout("Qwen3", composition="fused", **_LLAMA),
    "GemmaForCausalLM": Layout("Gemma", composition="fused", **_LLAMA),
    # Gemma2: norms after attention and MLP too; their outputs are what reaches the stream.
    "Gemma2ForCausalLM": Layout(
        "Gemma2", composition="fused", attn_site="post_attention_layernorm", mlp_site="post_feedforward_layernorm",
        **_LLAMA,
    ),  # fmt: skip
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
    # DeepSeek-V2/V3 (and Kimi K2): multi-head latent attention and a mixture of experts with shared
    # experts (dense MLPs in the first layers), in Llama's fused pairs and names.
    "DeepseekV2ForCausalLM": Layout("DeepSeek-V2", composition="fused", **_LLAMA),
    "DeepseekV3ForCausalLM": Layout("DeepSeek-V3", composition="fused", **_LLAMA),
    # Falcon-7B style: attention and MLP read one layer norm's output; both return (output, bias).
    "FalconForCausalLM": Layout(
        "Falcon", "transformer", "h", "ln_f", "self_attention", "mlp", "dense", "parallel", bias_apart=True
    ),
    # On vLLM's Transformers backend (vLLM 0.32 has no own class for these): Hugging Face's modules,
    # the layers called with the hidden states first.
    transformers_backend("GPTNeoXForCausalLM"): Layout(
        "GPT-NeoX", "model", "layers", "final_layer_norm", "attention", "mlp", "dense", "parallel",
        hidden_arg=0, batched=True,
    ),  # fmt: skip
    transformers_backend("PhiForCausalLM"): Layout(
        "Phi", "model", "layers", "final_layernorm", "self_attn", "mlp", "dense", "parallel", hidden_arg=0, batched=True
    ),
}

SUPPORTED = tuple(LAYOUTS)
assert all(s.part in ("block_in", "block_out", "attn", "mlp", "out_proj_in") for s in SITES.values())


def layout_for(model_class: str, architectures: list[str] | None = None) -> Layout | None:
    """The layout of a vLLM model class (for its Transformers backend: of the config's
    architecture), or None: probes are then refused, never guessed."""
    if model_class in LAYOUTS:
        return LAYOUTS[model_class]
    return next((LAYOUTS[k] for a in architectures or () if (k := f"{model_class}[{a}]") in LAYOUTS), None)


def unsupported_message(model_class: str, architectures: list[str] | None = None) -> str:
    """What a probe to a replica without a layout is told: the class vLLM loaded, and what is supported."""
    arch = f" (config architectures {architectures})" if architectures else ""
    return (
        f"probes are not available for this model: vLLM loaded it as {model_class}{arch}, which tpmflow's "
        f"layout table does not cover; probes support {', '.join(SUPPORTED)}. Generation, chat and "
        "embeddings are served as usual."
    )
