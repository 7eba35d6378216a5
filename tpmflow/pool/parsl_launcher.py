"""Replicas as long-running Parsl apps: the cluster launcher.

Each replica is a Parsl ``python_app`` on a named executor (an HTEX on GPU nodes, where
``available_accelerators`` pins a replica's GPUs, one per rank, to its worker through
``CUDA_VISIBLE_DEVICES``: ``tpmflow.parsl.sites.accelerator_groups``). The app
builds the replica's command and environment on the worker node — so the pinning Parsl did there
is inherited — runs the server in its own process group, and watches two things: the server (the
app returns when it dies, and the launcher submits it again) and the gateway (when the gateway is
gone for ``orphan_grace_s`` the app stops its replica, so no replica outlives its pool on a node
the launcher cannot reach).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from tpmflow.config import PoolConfig

log = logging.getLogger("tpmflow.launch")


def run_replica(
    cfg_json: str, index: int, gateway_url: str, secret: str, log_dir: str, host: str, orphan_grace_s: float = 30.0
) -> int:
    """Body of the Parsl app: serve one replica until it dies or its gateway disappears."""
    # Parsl ships this function to a worker: import everything here.
    import signal
    import time
    from pathlib import Path

    import httpx

    from tpmflow.config import PoolConfig
    from tpmflow.pool.launch import free_port
    from tpmflow.pool.replica import ReplicaProcess, cpu_binds, process_cores, replica_command, replica_env

    cfg = PoolConfig.model_validate_json(cfg_json)
    slot = cfg.slots()[index]
    try:
        bind = cpu_binds(cfg)[index]
    except ValueError:  # fewer cores here than ranks in the pool: only vLLM's CPU build reads the bind
        if cfg.engine.cpu_threads_bind != "auto":
            raise  # a bind the config names wrongly is an error, not a default
        bind = None
    replica_id = slot.replica_id
    port = free_port(host)
    url = f"http://{host}:{port}"
    proc = ReplicaProcess(
        replica_id,
        replica_command(cfg, port, host, index),
        replica_env(cfg, replica_id, url, gateway_url, secret, bind, slot.group),
        Path(log_dir) / f"{replica_id}.log",
        process_cores(cfg, index),
    )
    proc.start()
    last_seen = time.monotonic()
    try:
        while proc.alive():
            time.sleep(1.0)
            try:
                httpx.get(gateway_url + "/health", timeout=2.0)
                last_seen = time.monotonic()
            except httpx.HTTPError:
                if time.monotonic() - last_seen > orphan_grace_s:
                    break
    finally:
        proc.stop(grace_s=5)
    assert proc.proc is not None
    return proc.proc.returncode if proc.proc.returncode is not None else -signal.SIGKILL


class ParslLauncher:
    """Submits one long-running app per replica to ``cfg.launcher.parsl_executor`` of the loaded
    Parsl DataFlowKernel, and resubmits an app whose replica died."""

    def __init__(
        self,
        cfg: PoolConfig,
        gateway_url: str,
        secret: str,
        log_dir: Path,
        on_restart: Any = None,
        host: str = "127.0.0.1",
        orphan_grace_s: float = 30.0,
    ) -> None:
        from parsl import python_app

        from tpmflow.pool.shape import check_pool_shape

        check_pool_shape(cfg)  # a shape the model cannot take is refused here, not on every node
        self.cfg = cfg
        self.gateway_url = gateway_url
        self.secret = secret
        self.log_dir = log_dir
        self.on_restart = on_restart
        self.host = host
        self.grace = orphan_grace_s
        self._app = python_app(run_replica, executors=[cfg.launcher.parsl_executor])
        self.futures: dict[str, Future[int]] = {}
        self.restarts: dict[str, int] = {}
        self.index: dict[str, int] = {}  # replica id -> its slot index (version, cores)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def _submit(self, index: int) -> Future[int]:
        return self._app(
            self.cfg.model_dump_json(), index, self.gateway_url, self.secret, str(self.log_dir), self.host, self.grace
        )

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for slot in self.cfg.initial_slots():
            self.index[slot.replica_id] = slot.index
            self.futures[slot.replica_id] = self._submit(slot.index)
            self.restarts[slot.replica_id] = 0
        self._thread = threading.Thread(target=self._supervise, name="tpmflow-parsl-launcher", daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        while not self._stopping.wait(1.0):
            for replica_id, fut in list(self.futures.items()):
                if fut.done() and not self._stopping.is_set() and self.cfg.launcher.restart:
                    log.warning("%s app ended (%s); resubmitting", replica_id, fut.exception() or fut.result())
                    self.futures[replica_id] = self._submit(self.index[replica_id])
                    self.restarts[replica_id] += 1
                    if self.on_restart:
                        self.on_restart(replica_id)

    def stop(self) -> None:
        """Stop resubmitting; the apps stop their replicas once the gateway is gone."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def replica_ids(self) -> list[str]:
        return list(self.futures)

    def log_tail(self, replica_id: str, lines: int = 40) -> str:
        from tpmflow.pool.launch import tail_log

        return tail_log(self.log_dir, replica_id, lines)
