"""The sampling metrics on fixtures whose answers are known by hand."""

import pytest

from tpmflow.models.sampling_metrics import sample_metrics
from tpmflow.models.smiles_data import canonical


def test_known_answers() -> None:
    training = {canonical("CCO"), canonical("c1ccccc1")}
    samples = [
        "OCC",  # valid, = CCO (in training)
        "CCO",  # valid, duplicate of the above, in training
        "CCN",  # valid, novel
        "C1=CC=CC=C1",  # valid, = benzene (in training), Kekulé form
        "C(",  # invalid
        "",  # invalid (RDKit parses "" to an empty molecule; we do not count it)
        "CCCl",  # valid, novel
        "xyz",  # invalid
    ]
    m = sample_metrics(samples, training, canonical)
    assert m.n == 8 and m.n_valid == 5
    assert m.validity == pytest.approx(5 / 8)
    assert m.uniqueness == pytest.approx(4 / 5)  # CCO, CCN, benzene, CCCl
    assert m.novelty == pytest.approx(2 / 5)  # CCN, CCCl


def test_no_valid_sample_scores_zero_not_nan() -> None:
    m = sample_metrics(["((", "]"], ["CC"], canonical)
    assert (m.validity, m.uniqueness, m.novelty) == (0.0, 0.0, 0.0)


def test_empty_sample_list() -> None:
    m = sample_metrics([], ["CC"], canonical)
    assert m.n == 0 and m.validity == 0.0


def test_all_novel_and_unique() -> None:
    m = sample_metrics(["CCC", "CCCC", "CCCCC"], [canonical("CC")], canonical)
    assert (m.validity, m.uniqueness, m.novelty) == (1.0, 1.0, 1.0)
