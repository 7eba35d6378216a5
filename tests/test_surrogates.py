"""The campaigns' surrogates (scikit-learn wrappers): shapes, ranking, uncertainty, expected
improvement, determinism and bad input. Fast: no engine, no pool."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from apps.molecular_design.surrogate import BootstrapRidge, ucb
from apps.steering.agents import SurrogateAgent
from apps.steering.surrogate import GaussianProcess, expected_improvement, whiten


def fingerprint_data(rows: int, bits: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sparse binary features (like Morgan bits) and a linear target on them plus a little noise."""
    rng = np.random.default_rng(seed)
    x = (rng.random((rows, bits)) < 0.08).astype(np.float32)
    w = rng.normal(0.0, 1.0, bits) * (rng.random(bits) < 0.2)
    return x, x @ w + rng.normal(0.0, 0.1, rows)


def smooth_2d(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).uniform(-1.5, 1.5, (n, 2))
    return x, np.sin(2.0 * x[:, 0]) + np.cos(1.5 * x[:, 1])


def test_bootstrap_ridge_shapes_and_ucb() -> None:
    x, y = fingerprint_data(40)
    model = BootstrapRidge(members=5, seed=1).fit(x[:30], y[:30])
    mean, std = model.predict(x[30:])
    assert mean.shape == std.shape == (10,)
    assert np.all(std >= 0) and std.max() > 0
    assert np.allclose(ucb(mean, std, kappa=2.0), mean + 2.0 * std)


def test_bootstrap_ridge_ranks_a_linear_target_on_binary_features() -> None:
    x, y = fingerprint_data(400)
    mean, _ = BootstrapRidge(seed=0).fit(x[:300], y[:300]).predict(x[300:])
    assert spearmanr(mean, y[300:]).statistic > 0.6


def test_bootstrap_ridge_is_deterministic_for_a_seed() -> None:
    x, y = fingerprint_data(60)
    a = BootstrapRidge(seed=7).fit(x[:40], y[:40]).predict(x[40:])
    b = BootstrapRidge(seed=7).fit(x[:40], y[:40]).predict(x[40:])
    c = BootstrapRidge(seed=8).fit(x[:40], y[:40]).predict(x[40:])
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_gp_interpolates_a_smooth_2d_function() -> None:
    x, y = smooth_2d(40, seed=0)
    xt, yt = smooth_2d(200, seed=1)
    gp = GaussianProcess().fit(x, y)
    mean, std = gp.predict(xt)
    assert mean.shape == std.shape == (200,)
    assert np.sqrt(np.mean((mean - yt) ** 2)) < 0.1 * yt.std()
    assert gp.scale > 0 and gp.noise > 0


def test_gp_std_is_small_at_data_and_large_away_from_it() -> None:
    x, y = smooth_2d(30, seed=2)
    gp = GaussianProcess().fit(x, y)
    _, at_data = gp.predict(x)
    _, far = gp.predict(np.array([[8.0, 8.0], [-8.0, 6.0]]))
    assert at_data.max() < 0.1 * y.std()
    assert far.min() > 0.8 * y.std()  # back to the prior: unit variance on standardised targets


def test_gp_is_deterministic() -> None:
    x, y = smooth_2d(25, seed=3)
    xt, _ = smooth_2d(10, seed=4)
    a, b = GaussianProcess().fit(x, y).predict(xt), GaussianProcess().fit(x, y).predict(xt)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_expected_improvement_is_non_negative_and_largest_where_expected() -> None:
    mean = np.array([0.0, 1.0, 2.0, 1.0, -30.0])
    std = np.array([0.5, 0.5, 0.5, 2.0, 1e-9])
    ei = expected_improvement(mean, std, best=1.5)
    assert np.all(ei >= 0) and ei[4] == 0.0
    assert int(np.argmax(ei[:3])) == 2  # same spread: the highest mean
    assert ei[3] > ei[1]  # same mean: the larger spread
    low = expected_improvement(mean[:3], std[:3], best=0.5, maximize=False)
    assert int(np.argmax(low)) == 0
    assert np.allclose(expected_improvement(np.array([2.0, 1.0]), np.zeros(2), best=1.5), [0.5, 0.0])


def test_whiten_gives_unit_variance_components_and_drops_empty_ones() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 20))  # rank 3
    z = whiten(x, components=8)
    assert z.shape == (50, 3)
    assert np.allclose(z.mean(0), 0.0, atol=1e-9) and np.allclose(z.std(0), 1.0)


def test_surrogate_agent_finds_the_best_candidate_and_reports_the_gp() -> None:
    feature = np.linspace(-2, 2, 50)[:, None]
    value = -((feature[:, 0] - 1.3) ** 2)
    agent = SurrogateAgent(feature, warmup=np.array([0, 25, 49]), maximize=True)
    for _ in range(10):
        i = agent.suggest(1)[0]
        agent.ingest(i, float(value[i]))
    assert int(np.argmax(value)) in agent.seen
    report = agent.report()
    assert report["gp_length_scale"] > 0 and report["gp_noise"] > 0


@pytest.mark.parametrize("model", [BootstrapRidge, GaussianProcess])
def test_bad_input_raises_value_error(model: type) -> None:
    x, y = smooth_2d(20, seed=5)
    with pytest.raises(ValueError):
        model().fit(x, y[:-1])
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError):
        model().fit(bad, y)
    with pytest.raises(ValueError):
        model().fit(x, np.where(np.arange(20) == 4, np.nan, y))
    fitted = model().fit(x, y)
    with pytest.raises(ValueError):
        fitted.predict(bad)
    with pytest.raises(ValueError):
        fitted.predict(x[:, :1])  # wrong width
