"""``python -m tpmflow.gateway.serve``: one gateway as N worker processes on one port.

uvicorn's supervisor binds the port once and starts N workers that accept from the same socket;
each builds its own :class:`Gateway` from the environment (the pool config as JSON and the pool
secret), so no state but the database is shared: the replica registry through its ``replicas``
table (:mod:`tpmflow.gateway.shared_registry`), principals, ledger and allocations as always, and
the metrics through Prometheus' multiprocess files, added up on every ``/metrics``. A pool starts
this itself when ``gateway.workers`` > 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from fastapi import FastAPI

from tpmflow.protocol import SECRET_ENV

CONFIG_ENV = "TPMFLOW_GATEWAY_CONFIG"  # the PoolConfig, as JSON
WORKERS_ENV = "TPMFLOW_GATEWAY_WORKERS"


def create_worker_app() -> FastAPI:
    """One worker's app (uvicorn calls this in each worker process)."""
    from tpmflow.access import AccessDB, LedgerWriter
    from tpmflow.config import PoolConfig
    from tpmflow.gateway.app import Gateway
    from tpmflow.gateway.shared_registry import SharedReplicaRegistry
    from tpmflow.payload import PayloadStore

    cfg = PoolConfig.model_validate_json(os.environ[CONFIG_ENV])
    secret = os.environ[SECRET_ENV]
    access = AccessDB(cfg.database_url)
    ledger = LedgerWriter(access.engine)
    registry = SharedReplicaRegistry(cfg.gateway.heartbeat_timeout_s, access.engine, secret)
    gateway = Gateway(
        cfg, access, ledger, PayloadStore(cfg.store), secret, registry=registry, workers=int(os.environ[WORKERS_ENV])
    )
    gateway.on_stop.extend([registry.flush, ledger.close])  # nothing accepted is lost on the way out
    return gateway.app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=int(os.environ.get(WORKERS_ENV, "2")))
    args = parser.parse_args(argv)
    os.environ[WORKERS_ENV] = str(args.workers)
    metrics_dir = tempfile.mkdtemp(prefix="tpmflow-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before any worker imports prometheus_client
    try:
        uvicorn.run(
            "tpmflow.gateway.serve:create_worker_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
