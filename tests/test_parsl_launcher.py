"""Replicas as long-running Parsl apps on a real HighThroughputExecutor."""

from __future__ import annotations

from pathlib import Path

from tpmflow.config import LaunchConfig, PoolConfig
from tpmflow.payload import StoreConfig
from tpmflow.pool import Pool


def test_pool_with_parsl_launched_replica(tiny_model_dir: Path, tmp_path: Path) -> None:
    import parsl
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    parsl_config = Config(
        executors=[
            HighThroughputExecutor(
                label="tpm",
                max_workers_per_node=1,
                address="127.0.0.1",
                provider=LocalProvider(init_blocks=1, max_blocks=1),
            )
        ],
        run_dir=str(tmp_path / "runinfo"),
    )
    dfk = parsl.load(parsl_config)
    try:
        cfg = PoolConfig(
            model=str(tiny_model_dir),
            served_model_name="tiny-llama",
            replicas=1,
            # long enough that a heartbeat starved on a loaded machine is no lost gateway
            launcher=LaunchConfig(kind="parsl", parsl_executor="tpm", orphan_grace_s=15),
            store=StoreConfig(path=str(tmp_path / "store")),
            database_url=f"sqlite:///{tmp_path / 'access.db'}",
        )
        cfg.engine.max_model_len = 256
        pool = Pool(cfg)
        with pool:
            launcher = pool.launcher
            with pool.client() as c:
                out = c.generate("via parsl", max_tokens=3, temperature=0.0)
                assert out.usage["completion_tokens"] == 3
            future = launcher.futures["replica-0"]
            assert not future.done()  # a long-running app while the pool lives
        # Once the gateway is gone, the app stops its replica and returns.
        code = future.result(timeout=120)  # the grace, then the replica's shutdown
        assert isinstance(code, int)
        assert launcher.log_tail("replica-0")  # the replica's log came from the Parsl worker
    finally:
        dfk.cleanup()
        parsl.clear()
