"""A pool's gateway as N worker processes (``gateway.workers`` > 1), seen from the pool's process.

The pool starts ``python -m tpmflow.gateway.serve`` in its own process group and keeps a read view
of the shared replica registry, so waiting for replicas, restarts and ``tpmflow serve``'s output
work as with the in-process gateway.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tpmflow.config import PoolConfig
from tpmflow.gateway.serve import CONFIG_ENV, WORKERS_ENV
from tpmflow.gateway.shared_registry import SharedReplicaRegistry
from tpmflow.protocol import SECRET_ENV, Routes

log = logging.getLogger("tpmflow.gateway")


class GatewayWorkers:
    """The worker processes and the pool's view of their registry."""

    def __init__(self, cfg: PoolConfig, secret: str, host: str, port: int, engine: object, log_path: Path) -> None:
        self.cfg = cfg
        self.url = f"http://{host}:{port}"
        self.host, self.port = host, port
        self.secret = secret
        self.log_path = log_path
        self.registry = SharedReplicaRegistry(cfg.gateway.heartbeat_timeout_s, engine, secret)  # type: ignore[arg-type]
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._puller = threading.Thread(target=self._pull_forever, name="tpmflow-registry-view", daemon=True)

    def start(self, timeout_s: float = 60.0) -> None:
        env = {
            **os.environ,
            CONFIG_ENV: self.cfg.model_dump_json(),
            SECRET_ENV: self.secret,
            WORKERS_ENV: str(self.cfg.gateway.workers),
        }
        cmd = [sys.executable, "-m", "tpmflow.gateway.serve", "--host", self.host, "--port", str(self.port)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self._puller.start()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway's workers exited at start; see {self.log_path}")
            try:
                httpx.get(self.url + Routes.HEALTH, timeout=1.0)
                return  # answering (503 until a replica registers is fine)
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway workers did not answer on {self.url}; see {self.log_path}") from None
                time.sleep(0.1)

    def note_restart(self, replica_id: str) -> None:
        """The launcher restarted a replica: its old address is gone until it heartbeats again."""
        self.registry.mark_dead(replica_id)

    def _pull_forever(self) -> None:
        while not self._stop.wait(self.registry.sync_s):
            try:
                self.registry.pull()
            except Exception:  # noqa: BLE001 - a database hiccup: the next pull catches up
                log.debug("pulling the shared registry failed", exc_info=True)

    def stop(self, grace_s: float = 10.0) -> None:
        self._stop.set()
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # uvicorn's supervisor stops its workers gracefully
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
