"""``tpmflow models build-demo``: train a small SMILES language model on RDKit's NCI set.

Llama architecture with character tokens, trained from scratch with AdamW, warm-up and cosine
decay, deterministic for a seed (fixed step count, seeded init and batch order). The held-out
10% is fixed (see ``smiles_data``) and written into the card and ``split.json`` so later issues
never train heads on the model's training molecules and call them held out.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tpmflow import __version__
from tpmflow.models.build_common import build_atomically, llama_config, utc_now
from tpmflow.models.card import ModelCard, content_hash
from tpmflow.models.catalog import DEMO_MODEL
from tpmflow.models.char_tokenizer import SPECIAL_TOKENS, build_char_tokenizer
from tpmflow.models.sampling_metrics import sample_metrics
from tpmflow.models.smiles_data import SmilesSplit, canonical, load_split

DEMO_SHAPE = {"hidden": 128, "layers": 4, "heads": 2, "intermediate": 256, "max_positions": 256}
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# The quality floors for the demo model; asserted on its card by the test suite.
FLOORS = {"validity": 0.6, "uniqueness": 0.9, "novelty": 0.5}


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings; the defaults fit ~4 minutes on 2 CPU cores."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    seed: int = 0


def _vocab(split: SmilesSplit) -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(set("".join(split.train + split.heldout))):
        vocab.setdefault(ch, len(vocab))
    return vocab


def _encode(smiles: list[str], vocab: dict[str, int]) -> list[list[int]]:
    return [[BOS_ID, *(vocab[c] for c in s), EOS_ID] for s in smiles]


def _batches(seqs: list[list[int]], batch_size: int, generator: Any) -> Iterator[Any]:
    """Endless padded batches; similar lengths are grouped (less padding) but order stays seeded."""
    import torch

    while True:
        perm = torch.randperm(len(seqs), generator=generator).tolist()
        chunk = batch_size * 16
        batches: list[list[int]] = []
        for start in range(0, len(perm), chunk):
            group = sorted(perm[start : start + chunk], key=lambda i: len(seqs[i]))
            batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield _pad([seqs[i] for i in batches[b]])


def _pad(rows: list[list[int]]) -> Any:
    import torch

    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def _lm_loss(model: Any, ids: Any) -> tuple[Any, int]:
    """Summed next-token cross entropy over non-pad targets, and the number of targets."""
    import torch.nn.functional as F

    mask = ids != PAD_ID
    logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int(mask[:, 1:].sum())


def heldout_loss(model: Any, seqs: list[list[int]], batch_size: int = 128) -> float:
    """Mean next-token cross entropy (nats/token, ``</s>`` included) of ``seqs``."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            loss, n = _lm_loss(model, _pad(seqs[start : start + batch_size]))
            total += float(loss)
            count += n
    model.train()
    return total / count


def unigram_loss(train: list[list[int]], heldout: list[list[int]], vocab_size: int) -> float:
    """Held-out nats/token of a character-frequency model fitted on the training targets (add-one)."""
    counts = Counter(t for s in train for t in s[1:])
    total = sum(counts.values()) + vocab_size
    nll = [-math.log((counts[t] + 1) / total) for s in heldout for t in s[1:]]
    return sum(nll) / len(nll)


def _lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    settings: TrainSettings, split: SmilesSplit, vocab: dict[str, int], progress: bool = True
) -> tuple[Any, dict[str, Any]]:
    """Train the model; returns it with the training record for the card."""
    import torch
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    torch.manual_seed(settings.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    model = LlamaForCausalLM(llama_config(vocab_size=len(vocab), **DEMO_SHAPE)).to(torch.float32)
    model.config._attn_implementation = "sdpa"
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.98)
    )
    train_seqs = _encode(split.train, vocab)
    batches = _batches(train_seqs, settings.batch_size, torch.Generator().manual_seed(settings.seed))
    started = time.monotonic()
    ema: float | None = None
    bar = tqdm(range(settings.steps), desc="training SMILES model", unit="step", disable=not progress)
    for step in bar:
        for group in optimiser.param_groups:
            group["lr"] = _lr_at(step, settings)
        loss_sum, n = _lm_loss(model, next(batches))
        loss = loss_sum / n
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        value = float(loss.detach())
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        if step % 20 == 0:
            bar.set_postfix(loss=f"{ema:.3f}")
    record = {
        **asdict(settings),
        "optimizer": "AdamW(0.9, 0.98)",
        "schedule": "linear warm-up, cosine decay",
        "final_train_loss_ema": ema,
        "train_seconds": round(time.monotonic() - started, 1),
        "torch_threads": torch.get_num_threads(),
    }
    return model, record


def evaluate_samples(model_dir: Path, split: SmilesSplit, n: int, seed: int) -> dict[str, Any]:
    """Draw ``n`` samples at temperature 1.0 through vLLM and score them against the training set."""
    from tpmflow.models.offline_engine import open_offline_engine, sample_texts

    llm = open_offline_engine(model_dir)
    try:
        texts = sample_texts(llm, n=n, seed=seed, temperature=1.0, max_tokens=DEMO_SHAPE["max_positions"] - 2)
    finally:
        del llm
    metrics = sample_metrics(texts, split.train, canonical)
    return {**metrics.model_dump(), "temperature": 1.0, "sampler": "vllm", "sample_seed": seed, "examples": texts[:8]}


def build_demo(
    name: str = DEMO_MODEL,
    settings: TrainSettings | None = None,
    samples: int = 200,
    force: bool = False,
    progress: bool = True,
) -> tuple[Path, ModelCard]:
    """Train, save, sample through vLLM, score and write the card; returns the folder and card."""
    from transformers import GenerationConfig

    settings = settings or TrainSettings()
    split = load_split()
    vocab = _vocab(split)
    card_holder: list[ModelCard] = []

    def write(out: Path) -> None:
        model, record = train(settings, split, vocab, progress=progress)
        train_seqs, held_seqs = _encode(split.train, vocab), _encode(split.heldout, vocab)
        losses = {
            "heldout_loss": heldout_loss(model, held_seqs),
            "unigram_heldout_loss": unigram_loss(train_seqs, held_seqs, len(vocab)),
        }
        model.save_pretrained(str(out), safe_serialization=True)
        GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(str(out))
        build_char_tokenizer(vocab.keys() - set(SPECIAL_TOKENS), out, DEMO_SHAPE["max_positions"])
        (out / "split.json").write_text(json.dumps({"train": split.train, "heldout": split.heldout}))
        sampled = evaluate_samples(out, split, samples, seed=settings.seed) if samples else {}
        card = ModelCard(
            name=name,
            kind="demo",
            content_hash=content_hash(out),
            parameters=sum(p.numel() for p in model.parameters()),
            config={
                "vocab_size": len(vocab),
                **DEMO_SHAPE,
                "head_dim": 64,
                "dtype": "float32",
                "tokens": "characters of canonical SMILES",
            },
            seed=settings.seed,
            created=utc_now(),
            tpmflow_version=__version__,
            training=record,
            data={
                "source": split.source,
                "canonicalised": "RDKit MolToSmiles",
                "split": "fixed 10% held out (seed 20231113), independent of the training seed",
                "n_train": len(split.train),
                "n_heldout": len(split.heldout),
                "dropped_unparsable": split.dropped_unparsable,
                "dropped_too_long": split.dropped_too_long,
                "dropped_duplicates": split.dropped_duplicates,
                "heldout_lines": split.heldout_lines,
                "split_file": "split.json",
            },
            metrics={**losses, **sampled},
        )
        card.write(out)
        card_holder.append(card)

    path = build_atomically(name, write, force)
    return path, card_holder[0]
