"""The engine package's shape, without an engine: modules import without cycles, in any order and
each in a fresh interpreter; one table of hook sites; replica settings travel whole from the
launcher's ``replica_env`` to the replica's ``ReplicaSettings.from_env``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

ENGINE = Path(__file__).resolve().parents[1] / "tpmflow" / "engine"
MODULES = sorted(p.stem for p in ENGINE.glob("*.py") if p.stem != "__init__")
ROUTE_MODULES = [m for m in MODULES if m.endswith("_routes")]


def _engine_imports(module: str) -> set[str]:
    """The ``tpmflow.engine`` modules ``module`` imports anywhere (function-level imports included)."""
    tree = ast.parse((ENGINE / f"{module}.py").read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "tpmflow.engine":
                out.update(alias.name for alias in node.names)
            elif node.module.startswith("tpmflow.engine."):
                out.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[2] for a in node.names if a.name.startswith("tpmflow.engine."))
    return out & set(MODULES)


def test_engine_imports_form_no_cycle_and_routes_stay_apart() -> None:
    graph = {m: _engine_imports(m) for m in MODULES}
    for route in ROUTE_MODULES:
        assert not graph[route] & (set(ROUTE_MODULES) | {"plugin"}), f"{route} imports {graph[route]}"
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for dep in graph[module]:
            visit(dep, (*path, module))
        done.add(module)

    for module in MODULES:
        visit(module, ())


def test_each_engine_module_imports_first_in_a_fresh_interpreter() -> None:
    """Imported first, a module in a cycle meets a half-initialised partner and fails; then every
    other module after it. One interpreter per module, all at once (the suite must not get slower)."""
    runs = {}
    for module in MODULES:
        order = [module, *(m for m in MODULES if m != module)]
        code = "; ".join(f"import tpmflow.engine.{m}" for m in order)
        runs[module] = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    failed = {}
    for module, proc in runs.items():
        _, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failed[module] = err[-1500:]
    assert not failed, failed


def test_the_client_s_schema_needs_neither_torch_nor_vllm() -> None:
    code = (
        "import sys, tpmflow.schema, tpmflow.engine.sites; "
        "heavy = [m for m in ('torch', 'vllm', 'fastapi') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_one_table_of_sites() -> None:
    from tpmflow.engine.layouts import LAYOUTS
    from tpmflow.engine.sites import SITES, split_site
    from tpmflow.schema import ProbeSite

    assert get_args(ProbeSite) == tuple(SITES)
    for name, site in SITES.items():
        assert split_site(f"blocks.3.{name}") == (name, 3)
        assert split_site(site.alias) == (name, None)
        assert site.editable or site.edit_instead in SITES
    with pytest.raises(ValueError, match="unknown site"):
        split_site("hook_nonsense")
    with pytest.raises(ValueError, match="bad site"):
        split_site("blocks.x.hook_z")

    class Attn:
        o_proj = object()

    class Layer:
        self_attn = Attn()
        mlp = object()

    layout = LAYOUTS["LlamaForCausalLM"]
    layer = Layer()
    parts = {site.part: layout.part(layer, site.part) for site in SITES.values()}
    assert parts == {
        "block_in": layer,
        "block_out": layer,
        "attn": layer.self_attn,
        "mlp": layer.mlp,
        "out_proj_in": Attn.o_proj,
    }


def test_replica_settings_round_trip_through_replica_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tpmflow.config import PoolConfig
    from tpmflow.pool.replica import replica_env
    from tpmflow.protocol import ReplicaSettings

    # Stale settings in the launcher's environment must not reach the replica; settings the pool
    # does not decide (orphan grace, parts without a parts_path) are inherited.
    monkeypatch.setenv("TPMFLOW_GATEWAY_URL", "http://stale:1")
    monkeypatch.setenv("TPMFLOW_REPLICA_URL", "http://stale:2")
    monkeypatch.setenv("TPMFLOW_ORPHAN_GRACE_S", "5")
    monkeypatch.setenv("TPMFLOW_PARTS", str(tmp_path / "parts"))
    cfg = PoolConfig(
        model="m", store={"path": str(tmp_path / "store"), "inline_limit_bytes": 7}, max_activation_bytes=99
    )
    env = replica_env(cfg, "replica-3", "", "", "s3cret", bind="0-1", group="probe")
    got = ReplicaSettings.from_env(env)
    assert got == ReplicaSettings(
        replica_id="replica-3",
        replica_group="probe",
        pool_secret="s3cret",
        store=cfg.store.model_dump(mode="json"),
        parts=str(tmp_path / "parts"),
        max_activation_bytes=99,
        orphan_grace_s=5.0,
    )
    assert env["VLLM_API_KEY"] == "s3cret" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"

    cfg = cfg.model_copy(update={"parts_path": str(tmp_path / "pool-parts")})
    env = replica_env(cfg, "replica-4", "http://10.0.0.2:8001", "http://gw:8000", "s3cret", bind=None)
    got = ReplicaSettings.from_env(env)
    assert (got.replica_url, got.gateway_url, got.parts) == (
        "http://10.0.0.2:8001",
        "http://gw:8000",
        str(tmp_path / "pool-parts"),
    )
    assert got.replica_group == "default" and got.store["inline_limit_bytes"] == 7


def test_the_text_embedder_runs_vllm_s_pooling_runner_with_only_the_pooling_plugin(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pydantic import ValidationError

    from tpmflow.config import PoolConfig, TextEmbedderConfig
    from tpmflow.pool.replica import embedder_command, embedder_env

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")  # the model's binding is not the embedder's
    folder = tmp_path / "my-encoder"
    cfg = PoolConfig(model="m", text_embedder=TextEmbedderConfig(model=str(folder), max_model_len=128))
    assert [s.replica_id for s in cfg.embedder_slots()] == ["text-embedder-0"] and len(cfg.slots()) == 1
    cmd = embedder_command(cfg, 9001)
    assert cmd[cmd.index("--runner") + 1] == "pooling" and cmd[cmd.index("--model") + 1] == str(folder)
    assert cmd[cmd.index("--served-model-name") + 1] == "my-encoder" and "128" in cmd
    assert "--enable-prompt-embeds" not in cmd and "--worker-extension-cls" not in cmd, "an encoder takes no hooks"
    env = embedder_env(cfg, "text-embedder-0", "http://127.0.0.1:9001", "http://gw", "s3cret")
    assert env["VLLM_PLUGINS"] == "tpmflow-pooling" and "VLLM_CPU_OMP_THREADS_BIND" not in env
    assert env["TPMFLOW_REPLICA_GROUP"] == "text-embedder" and env["VLLM_API_KEY"] == "s3cret"
    assert PoolConfig(model="m", text_embedder={}).text_embedder.model == "all-minilm-l6-v2"  # type: ignore[arg-type, union-attr]
    with pytest.raises(ValidationError, match="local launcher"):
        PoolConfig(model="m", text_embedder={}, launcher={"kind": "parsl"})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="text embedder's group"):
        PoolConfig(model="m", replica_groups={"text-embedder": {}})  # type: ignore[arg-type]
