"""Shared steps of building a local model folder: Llama config, atomic save, card."""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tpmflow.paths import models_dir

# vLLM's CPU attention rejects head_dim 16; 64 is supported on every backend.
HEAD_DIM = 64


def llama_config(vocab_size: int, hidden: int, layers: int, heads: int, intermediate: int, max_positions: int) -> Any:
    """A small ``LlamaConfig`` with head_dim 64, untied embeddings and our special-token ids."""
    from transformers import LlamaConfig

    if hidden % heads or hidden // heads != HEAD_DIM:
        raise ValueError(f"hidden/heads must be {HEAD_DIM} (got {hidden}/{heads})")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )


def utc_now() -> str:
    """ISO-8601 UTC timestamp for cards."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def build_atomically(name: str, write: Callable[[Path], None], force: bool) -> Path:
    """Run ``write(tmp_dir)`` and move the result to ``models_dir()/name`` in one rename.

    An interrupted build leaves no half-written model that ``models list`` or a replica could pick up.
    """
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if final.exists() and not force:
        raise FileExistsError(f"{final} exists; pass --force to rebuild")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
