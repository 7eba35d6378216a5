"""``Pool``: gateway + replicas as one context manager, torn down completely on exit."""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from tpmflow.config import PoolConfig
from tpmflow.errors import ReplicaFailed
from tpmflow.paths import pool_logs_dir
from tpmflow.protocol import SECRET_ENV

log = logging.getLogger("tpmflow.pool")


class Pool:
    """A running pool. ``with Pool.from_config("configs/local.yaml") as pool: pool.client()...``

    The gateway serves from a thread of this process (uvicorn, real HTTP on ``cfg.gateway.host``);
    replicas are child process groups supervised by the launcher. ``stop()`` (also on exceptions,
    Ctrl-C and interpreter exit) kills every child group, so nothing is orphaned.
    """

    def __init__(self, cfg: PoolConfig) -> None:
        self.cfg = cfg
        # A pool with several gateways (``gateway.peers``) shares one secret: set TPMFLOW_POOL_SECRET
        # for the pool and for each `tpmflow gateway`; alone, a pool makes its own.
        self.secret = os.environ.get(SECRET_ENV) or secrets.token_urlsafe(32)
        check_peers(cfg, shared_secret=bool(os.environ.get(SECRET_ENV)))
        self.token: str | None = None
        self.gateway: Any = None
        self.launcher: Any = None
        self.autoscaler: Any = None
        self.access: Any = None
        self.ledger: Any = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.url = ""

    @classmethod
    def from_config(cls, config: str | Path | PoolConfig, **overrides: Any) -> Pool:
        cfg = config if isinstance(config, PoolConfig) else PoolConfig.from_yaml(config)
        if overrides:
            cfg = cfg.model_copy(update=overrides)
        return cls(cfg)

    def __enter__(self) -> Pool:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float | None = None) -> None:
        import uvicorn

        from tpmflow.access import AccessDB, LedgerWriter
        from tpmflow.gateway import Gateway
        from tpmflow.payload import PayloadStore
        from tpmflow.pool.launch import LocalLauncher, advertised_host, free_port
        from tpmflow.versioning.checkout import check_out

        cfg = self.cfg
        check_out(cfg)  # fail fast (ModelNotFound names the build command); versions checked out once
        self.access = AccessDB(cfg.database_url)
        self.ledger = LedgerWriter(self.access.engine)
        host = cfg.gateway.host
        port = cfg.gateway.port or free_port(host)
        self.url = f"http://{cfg.gateway.advertise_host or advertised_host(host)}:{port}"
        log_dir = pool_logs_dir(port)
        if cfg.gateway.workers > 1:  # N processes on one port, sharing registry, database and metrics
            from tpmflow.gateway.workers import GatewayWorkers

            self.gateway = GatewayWorkers(cfg, self.secret, host, port, self.access.engine, log_dir / "gateway.log")
            self.gateway.start()
        else:
            self.gateway = Gateway(cfg, self.access, self.ledger, PayloadStore(cfg.store), self.secret)
            config = uvicorn.Config(
                self.gateway.app,
                host=host,
                port=port,
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=2,
            )
            self._server = uvicorn.Server(config)
            self._thread = threading.Thread(target=self._server.run, name="tpmflow-gateway", daemon=True)
            self._thread.start()
            deadline = time.monotonic() + 30
            while not self._server.started:
                if time.monotonic() > deadline or not self._thread.is_alive():
                    raise RuntimeError(f"gateway did not start on {self.url}")
                time.sleep(0.05)
        if cfg.launcher.kind == "parsl":
            from tpmflow.pool.parsl_launcher import ParslLauncher

            self.launcher = ParslLauncher(
                cfg,
                self.url,
                self.secret,
                log_dir,
                on_restart=self.gateway.note_restart,
                host=cfg.launcher.replica_host,
                orphan_grace_s=cfg.launcher.orphan_grace_s,
            )
        else:
            self.launcher = LocalLauncher(
                cfg,
                self.url,
                self.secret,
                log_dir,
                on_restart=self.gateway.note_restart,
                host=cfg.launcher.replica_host,
            )
        atexit.register(self.stop)
        self.launcher.start()
        self.wait_ready(timeout_s or cfg.launcher.start_timeout_s)
        if cfg.launcher.kind == "local" and cfg.gateway.workers == 1:  # groups with min < max scale by queue depth
            from tpmflow.pool.autoscale import Autoscaler

            gauge = self.gateway.metrics.group_replicas
            self.autoscaler = Autoscaler(
                cfg, self.gateway.registry, self.launcher, on_change=lambda group, n: gauge.labels(group).set(n)
            )
            self.autoscaler.start()
        self.access.ensure_principal("pool-admin", "facility", {"generate", "embed", "probe", "admin"})
        self.token = self.access.create_token("pool-admin")

    def wait_ready(self, timeout_s: float, replicas: int | None = None) -> None:
        """Block until ``replicas`` (default: all) are registered and live."""
        want = len(self.cfg.initial_slots() + self.cfg.embedder_slots()) if replicas is None else replicas
        deadline = time.monotonic() + timeout_s
        while len(self.gateway.registry.live()) < want:
            gave_up = getattr(self.launcher, "gave_up", {})
            if gave_up:  # a replica that fails to start for a deterministic reason: say why now
                why = "; ".join(f"{r}: {cause}" for r, cause in gave_up.items())
                raise ReplicaFailed(f"replicas failed to start and are no longer restarted: {why}")
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {r}:\n{self.launcher.log_tail(r)}" for r in self.launcher.replica_ids())
                raise ReplicaFailed(
                    f"only {len(self.gateway.registry.live())}/{want} replicas came up in {timeout_s:.0f} s\n{tails}"
                )
            time.sleep(0.2)

    def add_principal(
        self,
        name: str,
        project: str | None = None,
        permissions: set[str] | None = None,
        service_class: str | None = None,
    ) -> str:
        """Create (or update) a principal and return a fresh token for it."""
        self.access.ensure_principal(name, project, permissions, service_class)
        return str(self.access.create_token(name))

    def client(self, token: str | None = None, **kwargs: Any) -> Any:
        from tpmflow.client import Client

        return Client(self.url, token=token or self.token, **kwargs)

    def stop(self) -> None:
        autoscaler, self.autoscaler = self.autoscaler, None
        if autoscaler is not None:
            autoscaler.stop()
        launcher, self.launcher = self.launcher, None
        if launcher is not None:
            launcher.stop()
        if self.gateway is not None and hasattr(self.gateway, "stop"):  # worker processes
            self.gateway.stop()
        if self._server is not None:  # Parsl-launched replicas stop themselves once this is gone
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._server = None
        if self.access is not None and self.token is not None:
            self.access.revoke(self.token)  # the admin token printed at start dies with the pool
            self.token = None
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        atexit.unregister(self.stop)


LOOPBACK = ("127.", "localhost", "::1")


def check_peers(cfg: PoolConfig, shared_secret: bool) -> None:
    """Refuse a pool whose other gateways (``gateway.peers``) could not use its replicas.

    Raises:
        ValueError: naming what to set.
    """
    from urllib.parse import urlparse

    if not cfg.gateway.peers:
        return
    if not shared_secret:
        raise ValueError(
            f"gateway.peers lists other gateways, which must share this pool's secret: set {SECRET_ENV} "
            "to the same value for `tpmflow serve` and every `tpmflow gateway`"
        )
    remote = [u for u in cfg.gateway.peers if not (urlparse(u).hostname or "").startswith(LOOPBACK)]
    if (
        remote
        and cfg.launcher.kind == "local"
        and not cfg.launcher.hosts
        and cfg.launcher.replica_host.startswith(LOOPBACK)
    ):
        raise ValueError(
            f"gateway.peers includes gateways on other hosts ({', '.join(remote)}), but replicas listen on "
            f"{cfg.launcher.replica_host}: set launcher.replica_host to an address those hosts reach"
        )
    if remote and cfg.store.connector == "file" and cfg.store.path is None:
        raise ValueError(
            "gateway.peers includes gateways on other hosts: the payload store must be shared with them "
            "(store.connector: redis, or store.path on a shared filesystem)"
        )
