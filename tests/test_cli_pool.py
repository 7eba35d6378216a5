"""`tpmflow serve`, `tokens` and `usage` from a shell, as a facility operator would use them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

CLI = [sys.executable, "-m", "tpmflow.cli"]


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "TPMFLOW_HOME": str(home)}


def test_tokens_and_usage_commands(tmp_path: Path) -> None:
    env = _env(tmp_path)
    token = subprocess.run(
        [*CLI, "tokens", "create", "carol", "--project", "beamline", "--permissions", "generate,probe"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert token.startswith("tpm_")
    listing = subprocess.run([*CLI, "tokens", "list"], env=env, capture_output=True, text=True, check=True).stdout
    assert token[:10] in listing and "carol" in listing and "active" in listing
    revoked = subprocess.run([*CLI, "tokens", "revoke", token[:10]], env=env, capture_output=True, text=True)
    assert revoked.returncode == 0 and "revoked 1" in revoked.stdout
    assert "revoked" in subprocess.run([*CLI, "tokens", "list"], env=env, capture_output=True, text=True).stdout
    missing = subprocess.run([*CLI, "tokens", "revoke", "tpm_nothing"], env=env, capture_output=True, text=True)
    assert missing.returncode == 1
    bad = subprocess.run(
        [*CLI, "tokens", "create", "dave", "--permissions", "fly"], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "InvalidRequest" in bad.stderr and "Traceback" not in bad.stderr
    usage = subprocess.run([*CLI, "usage", "--by", "project"], env=env, capture_output=True, text=True, check=True)
    assert "usage by project" in usage.stdout


def test_serve_prints_url_and_token_and_leaves_no_orphans(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = tmp_path / "pool.yaml"
    config.write_text(f"model: {tiny_model_dir}\nreplicas: 1\nengine:\n  max_model_len: 256\n")
    proc = subprocess.Popen(
        [*CLI, "serve", "--config", str(config)],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = token = None
    deadline = time.monotonic() + 240
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        while time.monotonic() < deadline and not (url and token):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("TPMFLOW_URL="):
                url = line.split("=", 1)[1].strip()
            if line.startswith("TPMFLOW_TOKEN="):
                token = line.split("=", 1)[1].strip()
        assert url and token, "".join(lines[-30:])
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "serve started no replica"
        resp = httpx.post(
            url + "/v1/completions",
            json={"prompt": "served", "max_tokens": 3},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    psutil.wait_procs(children, timeout=30)  # a real orphan outlives this too
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"orphaned processes: {[c.pid for c in alive]}"
