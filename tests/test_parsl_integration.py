"""tpmflow.parsl: site configs load and build their Parsl config without submitting anything, and
``@tpm_app`` runs on a real HighThroughputExecutor against the pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tpmflow.parsl import build_parsl_config, load_site, tpm_app

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize(
    ("name", "provider", "accelerators"),
    [("polaris", "PBSProProvider", 4), ("aurora", "PBSProProvider", 12), ("slurm", "SlurmProvider", 4)],
)
def test_cluster_sites_build_their_parsl_config(name: str, provider: str, accelerators: int, tmp_path: Path) -> None:
    site = load_site(CONFIGS / f"{name}.yaml")
    assert site.pool.launcher.kind == "parsl" and site.executor_labels() == ["tpm", "sim"]
    config = build_parsl_config(site, run_dir=str(tmp_path))
    tpm, sim = config.executors
    assert (tpm.label, sim.label) == ("tpm", "sim")
    assert type(tpm.provider).__name__ == provider
    assert len(tpm.available_accelerators) == accelerators == site.pool.replicas  # one replica per GPU (tile)
    assert tpm.prefetch_capacity == 0


def test_the_local_config_has_no_parsl_section() -> None:
    site = load_site(CONFIGS / "local.yaml")
    assert site.parsl is None and site.pool.launcher.kind == "local"
    with pytest.raises(ValueError, match="no parsl section"):
        build_parsl_config(site)


def test_a_site_whose_replica_executor_is_missing_is_refused(tmp_path: Path) -> None:
    bad = (CONFIGS / "slurm.yaml").read_text().replace("parsl_executor: tpm", "parsl_executor: gpus")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(ValueError, match="gpus"):
        load_site(tmp_path / "bad.yaml")


@tpm_app(executors=["work"])
def _embed_norms(client: Any, texts: list[str]) -> list[float]:
    import numpy as np

    return [float(np.linalg.norm(v)) for v in client.embed(texts).numpy()]


def test_tpm_app_runs_on_htex_with_a_client(pool: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import parsl
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    config = Config(
        executors=[
            HighThroughputExecutor(
                label="work",
                max_workers_per_node=2,
                address="127.0.0.1",
                # Workers import the app's function by name, as for any Parsl app defined in a module.
                provider=LocalProvider(init_blocks=1, worker_init=f"export PYTHONPATH={Path(__file__).parent}"),
            )
        ],
        run_dir=str(tmp_path / "runinfo"),
    )
    monkeypatch.setenv("TPMFLOW_URL", pool.url)
    monkeypatch.setenv("TPMFLOW_TOKEN", pool.token)
    dfk = parsl.load(config)
    try:
        futures = [_embed_norms(["parsl app", f"number {i}"]) for i in range(3)]
        results = [f.result(timeout=120) for f in futures]
    finally:
        dfk.cleanup()
        parsl.clear()
    assert all(len(r) == 2 and all(x > 0 for x in r) for r in results)
    monkeypatch.delenv("TPMFLOW_URL")
    with pytest.raises(RuntimeError, match="TPMFLOW_URL"):
        _embed_norms(["no pool"])
