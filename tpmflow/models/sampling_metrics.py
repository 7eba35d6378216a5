"""Quality of sampled molecules: validity, uniqueness, novelty (the usual generative-chemistry trio)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pydantic import BaseModel


class SampleMetrics(BaseModel):
    """Fractions over ``n`` samples; ``uniqueness`` and ``novelty`` are over the valid ones."""

    n: int
    n_valid: int
    validity: float
    uniqueness: float
    novelty: float


def sample_metrics(
    samples: list[str], training_set: Iterable[str], canonicalise: Callable[[str], str | None]
) -> SampleMetrics:
    """Compute the metrics.

    Args:
        samples: generated strings, duplicates included.
        training_set: canonical SMILES the model was trained on.
        canonicalise: maps a string to its canonical form, or ``None`` when it is not a molecule.

    validity = valid / n; uniqueness = distinct valid / valid; novelty = valid samples (duplicates
    counted) whose canonical form is not in the training set / valid. With no valid sample,
    uniqueness and novelty are 0 (nothing was achieved), not undefined.
    """
    train = set(training_set)
    valid = [c for c in (canonicalise(s) for s in samples) if c is not None]
    n_valid = len(valid)
    return SampleMetrics(
        n=len(samples),
        n_valid=n_valid,
        validity=n_valid / len(samples) if samples else 0.0,
        uniqueness=len(set(valid)) / n_valid if n_valid else 0.0,
        novelty=sum(c not in train for c in valid) / n_valid if n_valid else 0.0,
    )
