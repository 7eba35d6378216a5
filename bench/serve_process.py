"""Run `tpmflow serve` in its own process for benchmarks, so the gateway does not share the
benchmark client's interpreter (and GIL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import yaml


class ServedPool:
    """Context manager: a pool from ``config`` (a dict), with url, token, replica_urls and secret."""

    def __init__(self, config: dict[str, object]) -> None:
        self.config = config
        self.url = self.token = self.secret = ""
        self.replica_urls: list[str] = []
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> ServedPool:
        path = Path(tempfile.mkdtemp(prefix="tpmflow-bench-")) / "pool.yaml"
        path.write_text(yaml.safe_dump(self.config))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tpmflow.cli", "serve", "--config", str(path), "--show-internals"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        assert self._proc.stdout is not None
        deadline = time.monotonic() + 300
        values: dict[str, str] = {}
        while time.monotonic() < deadline and "TPMFLOW_POOL_SECRET" not in values:
            line = self._proc.stdout.readline()
            if not line:
                raise RuntimeError("tpmflow serve exited before it was ready")
            if line.startswith("TPMFLOW_") and "=" in line:
                key, value = line.strip().split("=", 1)
                values[key] = value
        self.url, self.token = values["TPMFLOW_URL"], values["TPMFLOW_TOKEN"]
        self.replica_urls = values["TPMFLOW_REPLICA_URLS"].split(",")
        self.secret = values["TPMFLOW_POOL_SECRET"]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
