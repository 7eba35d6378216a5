"""Every `tpmflow` command runs (in a scratch TPMFLOW_HOME where it writes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tpmflow.models.card import content_hash, read_card


def tpmflow(*args: str, home: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if home is not None:
        env["TPMFLOW_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "tpmflow.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_version() -> None:
    proc = tpmflow("version")
    assert proc.returncode == 0 and proc.stdout.startswith("tpmflow 0.")


def test_doctor_runs_and_prints_a_verdict() -> None:
    proc = tpmflow("doctor")
    assert "READY" in proc.stdout and "vLLM" in proc.stdout
    assert proc.returncode in (0, 1)


def test_models_list_empty_then_populated(tmp_path: Path) -> None:
    proc = tpmflow("models", "list", home=tmp_path)
    assert proc.returncode == 0 and "no models" in proc.stdout
    proc = tpmflow("models", "build-tiny", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = tpmflow("models", "list", home=tmp_path)
    assert "tiny-llama" in proc.stdout and "blake3:" in proc.stdout


def test_build_tiny_writes_a_loadable_hf_folder_with_a_true_hash(tmp_path: Path) -> None:
    proc = tpmflow("models", "build-tiny", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "models" / "tiny-llama"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    card = read_card(folder)
    assert card.content_hash == content_hash(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 64  # vLLM's CPU attention needs 64
    # Idempotent: a second call skips, a forced one rebuilds the same weights (same seed).
    assert "already built" in tpmflow("models", "build-tiny", home=tmp_path).stdout
    assert tpmflow("models", "build-tiny", "--force", home=tmp_path).returncode == 0
    assert read_card(folder).content_hash == card.content_hash


def test_build_demo_runs_end_to_end_small(tmp_path: Path) -> None:
    """A few steps and no sampling: the command path, card and split. The full model's quality is
    checked on the real card in test_demo_model.py."""
    proc = tpmflow("models", "build-demo", "--steps", "4", "--samples", "0", home=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = read_card(tmp_path / "models" / "smiles-llama")
    assert card.kind == "demo" and card.training["steps"] == 4
    assert card.metrics["heldout_loss"] > 0 and card.metrics["unigram_heldout_loss"] > 0
    assert card.data["n_heldout"] > 400 and len(card.data["heldout_lines"]) == card.data["n_heldout"]


def test_adapters_list_and_show(tmp_path: Path) -> None:
    env = {**os.environ, "TPMFLOW_PARTS": str(tmp_path)}
    listing = subprocess.run(
        [sys.executable, "-m", "tpmflow.cli", "adapters", "list"], capture_output=True, text=True, env=env, timeout=120
    )
    assert listing.returncode == 0 and "smiles" in listing.stdout and "no trained parts yet" in listing.stdout
    show = subprocess.run(
        [sys.executable, "-m", "tpmflow.cli", "adapters", "show", "smiles"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert show.returncode == 0 and "molecule" in show.stdout and "max_heavy_atoms" in show.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "tpmflow.cli", "adapters", "show", "nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert missing.returncode == 2 and "not installed" in missing.stderr


def test_slo_report_without_and_with_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = tpmflow("slo", "report", home=tmp_path)
    assert plain.returncode == 0 and "no service class has SLO targets" in plain.stdout, plain.stderr
    config = tmp_path / "pool.yaml"
    config.write_text("model: tiny-llama\nservice_classes:\n  batch: {priority: 10, min_tokens_per_s: 50}\n")
    proc = tpmflow("slo", "report", "--config", str(config), "--window", "30m", "--json", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    (batch,) = report["classes"]
    assert (batch["service_class"], batch["verdict"], batch["requests"]) == ("batch", "no data", 0)
    assert report["until"] - report["since"] == pytest.approx(1800)
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps narrow tables
    table = tpmflow("slo", "report", "--config", str(config), home=tmp_path)
    assert table.returncode == 0 and "batch" in table.stdout and "NO DATA" in table.stdout, table.stdout
    bad = tpmflow("slo", "report", "--window", "soon", home=tmp_path)
    assert bad.returncode == 2 and "not a duration" in bad.stderr
