"""Training soft-token encoders and projectors against a frozen transformers copy of the core.

vLLM has no backward pass. The served model and a transformers model loaded from the same folder
compute the same final hidden states for the same soft tokens and text (``tests/test_soft_tokens.py``
checks it to 2e-3 in float32), so parts trained here behave the same when the pool serves them.
Train against the dtype the pool serves; the card records what the part was trained with. The core stays frozen: only the adapter's encoder,
its projector and a temporary linear head on the pooled final states learn. The head that is
finally served is refitted on embeddings fetched from the pool (``fit_served_head``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tpmflow.adapters.soft import SoftTokenAdapter, text_around

if TYPE_CHECKING:
    import torch

    from tpmflow.adapters.soft_model import SoftTokenModel

# torch (and transformers) come only with the cpu / gpu extras: imported where training runs, so
# importing this module (e.g. for ``Task`` or ``FrozenCore`` in a signature) needs neither.

Task = Literal["classification", "regression"]


@dataclass
class FrozenCore:
    """A transformers copy of the core model, every weight frozen."""

    model: Any
    tokenizer: Any
    hidden_size: int

    @classmethod
    def load(cls, model_dir: str | Path) -> FrozenCore:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model, AutoTokenizer.from_pretrained(str(model_dir)), int(model.config.hidden_size))

    def pooled(self, soft: torch.Tensor, prefix: str = "", suffix: str = "") -> torch.Tensor:
        """Mean over every prompt position of the final hidden states (after the final norm) — what
        the pool's ``pooling="mean"`` returns for the same soft tokens and text."""
        import torch

        before, after = text_around(self.tokenizer, prefix, suffix)
        table = self.model.get_input_embeddings()
        batch = soft.shape[0]
        rows = []
        if before:
            rows.append(table(torch.tensor(before)).unsqueeze(0).expand(batch, -1, -1))
        rows.append(soft)
        if after:
            rows.append(table(torch.tensor(after)).unsqueeze(0).expand(batch, -1, -1))
        states = self.model.model(inputs_embeds=torch.cat(rows, dim=1)).last_hidden_state
        return states.mean(dim=1)


@dataclass
class TrainReport:
    steps: int
    final_loss: float
    seconds: float
    losses: list[float] = field(default_factory=list)


def train_soft_tokens(
    adapter: SoftTokenAdapter,
    core: FrozenCore,
    inputs: np.ndarray,
    targets: np.ndarray,
    task: Task,
    n_classes: int = 0,
    steps: int = 300,
    batch: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[SoftTokenModel, TrainReport]:
    """Train the adapter's encoder + projector through the frozen core with a temporary linear head
    on the mean-pooled final states (cross-entropy or MSE on standardised targets)."""
    import time

    import torch
    from torch import nn

    started = time.monotonic()
    model = adapter.new_model(core.hidden_size, seed=seed)
    out_dim = n_classes if task == "classification" else 1
    head = nn.Linear(core.hidden_size, out_dim)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    x_all = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    if task == "classification":
        y_all = torch.from_numpy(targets.astype(np.int64))
    else:
        mean, std = float(targets.mean()), float(targets.std() + 1e-6)
        y_all = torch.from_numpy(((targets - mean) / std).astype(np.float32))
    prefix = getattr(adapter.settings, "prefix", "")
    suffix = getattr(adapter.settings, "suffix", "")
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    model.train()
    for step in range(steps):
        idx = torch.from_numpy(rng.choice(len(x_all), size=min(batch, len(x_all)), replace=False))
        pooled = core.pooled(model(x_all[idx]), prefix, suffix)
        pred = head(pooled)
        if task == "classification":
            loss = nn.functional.cross_entropy(pred, y_all[idx])
        else:
            loss = nn.functional.mse_loss(pred.squeeze(-1), y_all[idx])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    model.eval()
    tail = losses[-20:]
    report = TrainReport(steps, float(np.mean(tail)), time.monotonic() - started, losses)
    return model, report


def save_projector(
    adapter: SoftTokenAdapter,
    model: SoftTokenModel,
    name: str,
    version: str,
    base_model: str,
    base_content_hash: str,
    hidden_size: int,
    training_data: dict[str, Any],
    metrics: dict[str, Any],
    owner: str = "facility",
) -> str:
    """Save encoder + projector as a part; returns its ``name@version``."""
    from tpmflow.adapters.parts import PartCard, save_part

    card = PartCard(
        adapter=adapter.name,
        name=name,
        version=version,
        kind="projector",
        owner=owner,
        modality=adapter.modality,
        base_model=base_model,
        base_content_hash=base_content_hash,
        hidden_size=hidden_size,
        settings={k: v for k, v in adapter.config().items() if k != "part"},
        training_data=training_data,
        metrics=metrics,
    )
    save_part(dict(model.state_dict()), card)
    return f"{name}@{version}"
