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
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from tpmflow.config import PoolConfig
from tpmflow.pool.multinode import app_resources

log = logging.getLogger("tpmflow.launch")


def run_replica(
    cfg_json: str,
    index: int,
    gateway_url: str,
    secret: str,
    log_dir: str,
    host: str,
    orphan_grace_s: float = 30.0,
    parsl_resource_specification: dict | None = None,  # noqa: ARG001 - read by Parsl (MPI mode: the nodes)
) -> int:
    """Body of the Parsl app: serve one replica until it dies or its gateway disappears."""
    # Parsl ships this function to a worker: import everything here.
    import os
    import signal
    import time
    from pathlib import Path

    import httpx

    from tpmflow.config import PoolConfig
    from tpmflow.pool.launch import advertised_host, free_port
    from tpmflow.pool.replica import ReplicaProcess, cpu_binds, process_cores, replica_command, replica_env
    from tpmflow.protocol import gateway_urls

    def answers(url: str) -> bool:
        """Whether a gateway answers its health check (any status: it is up)."""
        try:
            httpx.get(url + "/health", timeout=2.0)
            return True
        except httpx.HTTPError:
            return False

    cfg = PoolConfig.model_validate_json(cfg_json)
    slot = cfg.slots()[index]
    try:
        bind = cpu_binds(cfg)[index]
    except ValueError:  # fewer cores here than ranks in the pool: only vLLM's CPU build reads the bind
        if cfg.engine.cpu_threads_bind != "auto":
            raise  # a bind the config names wrongly is an error, not a default
        bind = None
    replica_id = slot.replica_id
    if cfg.engine.nodes > 1:  # over several nodes of this block: one node agent per node, by MPI launcher
        from tpmflow.pool.multinode import mpi_launch

        nodelist = [h for h in os.environ.get("PARSL_MPI_NODELIST", "").split(",") if h]
        port = cfg.launcher.replica_port + index
        cmd, plan = mpi_launch(
            cfg, index, replica_id, nodelist, os.environ.get("PARSL_MPI_PREFIX", ""), port, host
        )
        url = f"http://{plan.master_addr}:{port}"
        env = {**replica_env(cfg, replica_id, url, gateway_url, secret, None, slot.group), **plan.to_env()}
        proc = ReplicaProcess(replica_id, cmd, env, Path(log_dir) / f"{replica_id}.log")
    else:
        port = free_port(host)
        url = f"http://{advertised_host(host)}:{port}"
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
            if answers(gateway_urls(gateway_url)[0]):  # the launcher's own gateway (peers only route)
                last_seen = time.monotonic()
            elif time.monotonic() - last_seen > orphan_grace_s:
                break  # the pool that started this replica is gone
    finally:
        # A replica over nodes stops through its MPI launcher: give the node agents time to stop vLLM.
        proc.stop(grace_s=30 if cfg.engine.nodes > 1 else 5)
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
        self._submitted: dict[str, float] = {}  # replica id -> when its current app was submitted
        self._quick_failures: dict[str, int] = {}  # replica id -> apps in a row that raised soon after
        self.gave_up: dict[str, str] = {}  # replica id -> why it is no longer resubmitted (Pool.wait_ready says it)

    def _submit(self, index: int) -> Future[int]:
        self._submitted[self.cfg.slots()[index].replica_id] = time.monotonic()
        # A replica over several nodes asks Parsl's MPI mode for them (one rank each: its node agent).
        spec = app_resources(self.cfg.engine.nodes) if self.cfg.engine.nodes > 1 else {}
        return self._app(
            self.cfg.model_dump_json(), index, self.gateway_url, self.secret, str(self.log_dir), self.host, self.grace,
            parsl_resource_specification=spec,
        )  # fmt: skip

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for slot in self.cfg.initial_slots():
            self.index[slot.replica_id] = slot.index
            self.futures[slot.replica_id] = self._submit(slot.index)
            self.restarts[slot.replica_id] = 0
        self._thread = threading.Thread(target=self._supervise, name="tpmflow-parsl-launcher", daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        from tpmflow.pool.launch import MAX_QUICK_EXITS, QUICK_EXIT_S, root_cause

        while not self._stopping.wait(1.0):
            for replica_id, fut in list(self.futures.items()):
                if not fut.done() or self._stopping.is_set() or not self.cfg.launcher.restart:
                    continue
                if replica_id in self.gave_up:
                    continue
                error = fut.exception() if not fut.cancelled() else RuntimeError("the app was cancelled")
                # An app that ends soon after its submission, again and again (a node that does not
                # resolve, a model vLLM cannot load), ends for a reason a resubmission will not fix.
                quick = time.monotonic() - self._submitted[replica_id] < QUICK_EXIT_S
                self._quick_failures[replica_id] = self._quick_failures.get(replica_id, 0) + 1 if quick else 0
                if self._quick_failures[replica_id] >= MAX_QUICK_EXITS:
                    cause = root_cause(self.log_tail(replica_id, 400).splitlines())
                    self.gave_up[replica_id] = f"{type(error).__name__}: {error}" if error else (
                        cause or f"the replica exited with code {fut.result()}"
                    )
                    log.error("%s failed %d times in a row; not resubmitting it: %s", replica_id, MAX_QUICK_EXITS,
                              self.gave_up[replica_id])  # fmt: skip
                    continue
                log.warning("%s app ended (%s); resubmitting", replica_id, error if error else fut.result())
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
