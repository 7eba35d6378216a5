"""Fit a soft-token adapter and check, honestly, whether the core model helps.

One run: train the encoder + projector through a frozen transformers copy of the core; save it as
a part; fit the served head on embeddings fetched from the pool; score the held-out items with
``client.predict``. Reported next to two baselines: the same kind of head on the trained encoder's
own features (no core model), and the whole pipeline with an untrained (random) encoder + projector,
also served by the pool. The point is to learn whether the core helps, not to pass.

An adapter package exposes its own run as a ``tpmflow.fits`` entry point,
``quality_check(client, core_dir, version=..., steps=..., progress=...) -> QualityReport`` (usually a
call of ``fit_soft_adapter`` on its data), and ``tpmflow adapters fit <name>`` starts a pool, calls
it in the pool's parts folder and prints the report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tpmflow.adapters.heads import RidgeHead, SoftmaxHead, accuracy, r2, save_head
from tpmflow.adapters.parts import PartCard, update_metrics
from tpmflow.adapters.soft import SoftTokenAdapter
from tpmflow.adapters.training import FrozenCore, Task, save_projector, train_soft_tokens
from tpmflow.errors import InvalidRequest
from tpmflow.paths import parts_dir


@dataclass
class QualityReport:
    """Held-out scores of the head on core embeddings and of the two baselines; what a
    ``tpmflow.fits`` entry point returns. ``metric`` names the score (``accuracy``: higher is better;
    ``mae``: lower is better); ``extra`` holds every score by name (``core_r2``, ``encoder_r2``,
    ``random_r2`` are shown beside an MAE, ``classical_*`` ones as extra rows)."""

    task: Task
    metric: str
    core: float
    encoder_alone: float
    random_projector: float
    projector: str
    head: str
    n_train: int
    n_heldout: int
    train_seconds: float
    extra: dict[str, float]


def _prepared(adapter: SoftTokenAdapter, items: Sequence[Any]) -> np.ndarray:
    prepared = adapter.prepare(items)
    bad = [p for p in prepared if not isinstance(p, np.ndarray)]
    if bad:
        raise ValueError(f"training item refused: {bad[0]}")
    return np.stack(prepared)  # type: ignore[arg-type]


def _embed(client: Any, adapter: str, part: str, items: Sequence[Any], batch: int, desc: str) -> np.ndarray:
    from tqdm import tqdm

    rows = []
    for start in tqdm(range(0, len(items), batch), desc=desc, unit="batch", leave=False):
        try:
            out = client.embed(list(items[start : start + batch]), adapter=adapter, adapter_config={"part": part})
        except InvalidRequest as exc:
            if "no part " not in str(exc):
                raise
            # Saved here, missing there: this process and the pool use two parts folders.
            raise InvalidRequest(
                f"the pool has no part {part!r} of adapter {adapter!r}, which was just saved in {parts_dir()}: "
                "the pool reads its config's parts_path; run this inside "
                "`with use_parts_dir(pool_parts_dir(pool)):` (tpmflow.adapters.parts) or set $TPMFLOW_PARTS to it"
            ) from exc
        rows.append(out.numpy())  # training items parsed already: an error here is a real failure
    return np.concatenate(rows)


def _served_model(client: Any, core_dir: str | Path, hidden_size: int) -> dict[str, Any]:
    """The pool's model (from a response's provenance); it must be the copy trained against here."""
    from tpmflow.models.card import version_of

    provenance = client.embed(["a"]).provenance
    local = version_of(Path(core_dir))
    if provenance["content_hash"] != local:
        raise ValueError(
            f"the pool serves {provenance['model']} ({provenance['content_hash'][:19]}), but training used "
            f"{core_dir} ({local[:19]}): train against the served weights"
        )
    return {"base_model": provenance["model"], "base_content_hash": local, "hidden_size": hidden_size}


def _fit_head(x: np.ndarray, y: np.ndarray, task: Task, classes: list[str]) -> Any:
    if task == "classification":
        return SoftmaxHead.fit_with_validation(x, y, classes)[0]
    return RidgeHead.fit_with_validation(x, y.astype(np.float64))[0]


def _score(task: Task, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    if task == "classification":
        return {"accuracy": accuracy(y, pred)}
    return {"mae": float(np.abs(y - pred).mean()), "r2": r2(y.astype(np.float64), pred.astype(np.float64))}


def fit_soft_adapter(
    client: Any,
    core_dir: str | Path,
    adapter: SoftTokenAdapter,
    train: tuple[Sequence[Any], np.ndarray],
    heldout: tuple[Sequence[Any], np.ndarray],
    task: Task,
    target: str,
    classes: Sequence[str] = (),
    name: str = "projector",
    version: str = "0.1.0",
    steps: int = 300,
    batch: int = 32,
    training_data: dict[str, Any] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> QualityReport:
    """Train, save, serve, score; see the module docstring. Items are what a client sends (arrays,
    file bytes); targets are class indices or values."""
    (train_items, y_train), (held_items, y_held) = train, heldout
    classes = list(classes)
    core = FrozenCore.load(core_dir)
    x_train = _prepared(adapter, train_items)
    model, report = train_soft_tokens(
        adapter, core, x_train, y_train, task, n_classes=len(classes), steps=steps, batch=batch, progress=progress
    )
    base = _served_model(client, core_dir, core.hidden_size)
    data = {**(training_data or {}), "n_train": len(train_items), "n_heldout": len(held_items)}

    # Baseline 1: the trained encoder's own pooled features, no core model.
    adapter.use_model(model)
    x_held = _prepared(adapter, held_items)
    enc_head = _fit_head(adapter.encoder_features(x_train), y_train, task, classes)
    encoder_scores = _score(task, y_held, enc_head.predict(adapter.encoder_features(x_held)))

    projector = save_projector(
        adapter, model, name, version, training_data=data, metrics={"train_loss": report.final_loss}, **base
    )
    random_model = adapter.new_model(core.hidden_size, seed=1_000_003)
    random_projector = save_projector(
        adapter, random_model, f"{name}-random", version, training_data={"untrained": "baseline"}, metrics={}, **base
    )

    scores: dict[str, dict[str, float]] = {}
    heads: dict[str, str] = {}
    for label, part in (("core", projector), ("random", random_projector)):
        x = _embed(client, adapter.name, part, train_items, 64, f"embedding training items ({label})")
        head = _fit_head(x, y_train, task, classes)
        head_name = target if label == "core" else f"{target}-random"
        card = PartCard(
            adapter=adapter.name,
            name=head_name,
            version=version,
            kind="softmax-classifier" if task == "classification" else "ridge-regression",
            modality=adapter.modality,
            target=target,
            classes=classes,
            settings={"part": part},
            training_data={**data, "features": f"mean-pooled final states through projector {part}"},
            **base,
        )
        save_head(head, card)
        heads[label] = f"{head_name}@{version}"
        values: list[Any] = []
        for start in range(0, len(held_items), 64):
            out = client.predict(list(held_items[start : start + 64]), adapter=adapter.name, head=heads[label])
            if out.errors:
                raise out.errors[0]
            values.extend(out.values)
        if task == "classification":
            pred = np.array([classes.index(v) for v in values])
        else:
            pred = np.array(values, dtype=np.float64)
        scores[label] = _score(task, y_held, pred)
        update_metrics(adapter.name, heads[label], {f"heldout_{k}": v for k, v in scores[label].items()})

    # The core head's card carries both baselines beside its own score.
    update_metrics(
        adapter.name,
        heads["core"],
        {f"heldout_{k}_encoder_alone": v for k, v in encoder_scores.items()}
        | {f"heldout_{k}_random_projector": v for k, v in scores["random"].items()},
    )

    metric = "accuracy" if task == "classification" else "mae"
    extra = {f"{label}_{k}": v for label, s in scores.items() for k, v in s.items()}
    extra.update({f"encoder_{k}": v for k, v in encoder_scores.items()})
    return QualityReport(
        task=task,
        metric=metric,
        core=scores["core"][metric],
        encoder_alone=encoder_scores[metric],
        random_projector=scores["random"][metric],
        projector=projector,
        head=heads["core"],
        n_train=len(train_items),
        n_heldout=len(held_items),
        train_seconds=report.seconds,
        extra=extra,
    )
