"""The workbench's Campaigns page (``/ui/campaigns``): the molecular design campaign's run folders
(``apps/molecular_design/campaign.py``), live while they run and summed up once they end.

Which folders is the operator's choice (``gateway.campaign_dirs``): every signed-in principal sees
the runs there. A run is named by an opaque id derived from its path, and only paths found under
those folders are ever read: nothing from the request becomes a path. The CSV is read as the
campaign writes it, so a half-written last row is skipped; SMILES, errors and run.json values are
untrusted and reach the page as JSON that its script inserts with ``textContent`` only.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tpmflow.ui.molecules import draw

if TYPE_CHECKING:
    from tpmflow.access import Principal
    from tpmflow.ui.pages import Workbench

CSV_NAME, RUN_JSON = "simulations.csv", "run.json"
TOP_MOLECULES = 12
MAX_RUN_JSON = 4 << 20
_RUN_ID = re.compile(r"^[0-9a-f]{16}$")


@dataclass
class Sim:
    """One row of simulations.csv."""

    arm: str
    seed: str
    index: int
    smiles: str
    source: str
    objective: float | None
    error: str


@dataclass
class Run:
    """A run folder and what its files say now."""

    id: str
    path: Path
    sims: list[Sim] = field(default_factory=list)
    record: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def failures(self) -> int:
        return sum(1 for s in self.sims if s.error)

    @property
    def best(self) -> float | None:
        return max((s.objective for s in self.sims if s.objective is not None), default=None)


# -- finding and reading runs ---------------------------------------------------------------------


MAX_CSV_BYTES = 64 << 20  # a campaign's simulations.csv read per poll at most
MAX_INDEX = 100_000  # simulations per (arm, seed) drawn at most
MAX_CAMPAIGN_JSON = 64 << 10


def run_id(path: Path) -> str:
    """An opaque, stable name for a run folder: the request names a run by it, never by a path."""
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]


def find_runs(dirs: list[str]) -> dict[str, Path]:
    """Run id -> folder: each configured folder, or each of its direct subfolders, that holds a
    simulations.csv (newest first within a folder)."""
    runs: dict[str, Path] = {}
    for d in dirs:
        root = Path(d).expanduser().resolve()
        try:
            candidates = [root] if (root / CSV_NAME).is_file() else [p for p in root.iterdir() if p.is_dir()]
            # A symlink out of the published folder (to the folder or its files) is not followed.
            found = [p for p in candidates if _inside(root, p) and _inside(root, p / CSV_NAME)]
            found.sort(key=lambda p: (p / CSV_NAME).stat().st_mtime, reverse=True)
        except OSError:  # a folder not there (yet), or unreadable: nothing to list from it
            continue
        for path in found:
            runs.setdefault(run_id(path), path)
    return runs


def _inside(root: Path, path: Path) -> bool:
    """``path`` is a file or folder whose real location is within ``root``."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    return real == root or root in real.parents


def _number(text: str | None) -> float | None:
    try:
        value = float(text or "nan")
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_sims(path: Path) -> list[Sim]:
    """The rows written so far. The campaign appends a row at a time, so a last line without its
    newline is still being written and is skipped, as is any row that does not parse."""
    try:
        if path.stat().st_size > MAX_CSV_BYTES:
            return []
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    sims: list[Sim] = []
    reader = csv.reader(io.StringIO(text), strict=True)  # a quoted field cut short raises, not passes
    try:
        header = next(reader)
        for values in reader:
            if len(values) != len(header):
                continue
            row = dict(zip(header, values, strict=True))
            try:
                index = int(row.get("index", ""))
            except ValueError:
                continue
            if not 0 <= index < MAX_INDEX:  # a campaign's budget, not a series to allocate
                continue
            sims.append(
                Sim(
                    arm=row.get("arm", ""),
                    seed=row.get("seed", ""),
                    index=index,
                    smiles=row.get("smiles", ""),
                    source=row.get("source", ""),
                    objective=_number(row.get("objective")),
                    error=row.get("error", ""),
                )
            )
    except (StopIteration, csv.Error):  # empty, or a quoted field cut short: what parsed so far stands
        pass
    return sims


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity (run.json may hold them): they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def read_record(path: Path) -> dict[str, Any] | None:
    """run.json once the run has ended; None before (or while it is being written)."""
    file = path / RUN_JSON
    try:
        if file.stat().st_size > MAX_RUN_JSON:
            return None
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return _finite(record) if isinstance(record, dict) else None


def read_run(rid: str, path: Path) -> Run:
    return Run(rid, path, read_sims(path / CSV_NAME), read_record(path))


# -- what the page shows --------------------------------------------------------------------------


def best_series(sims: list[Sim]) -> tuple[int, dict[str, list[float | None]], dict[str, dict[str, list[float | None]]]]:
    """Best objective found after 1..n simulations, per arm and seed, and per arm the mean over the
    seeds that have reached that count and found something (None: no value yet)."""
    values: dict[str, dict[str, dict[int, float | None]]] = {}
    for s in sims:
        values.setdefault(s.arm, {}).setdefault(s.seed, {})[s.index] = s.objective
    per_seed: dict[str, dict[str, list[float | None]]] = {}
    for arm, runs in values.items():
        for seed, by_index in runs.items():
            best: float | None = None
            curve: list[float | None] = []
            for i in range(max(by_index) + 1):
                v = by_index.get(i)
                if v is not None and (best is None or v > best):
                    best = v
                curve.append(best)
            per_seed.setdefault(arm, {})[seed] = curve
    n = max((len(c) for seeds in per_seed.values() for c in seeds.values()), default=0)
    mean: dict[str, list[float | None]] = {}
    for arm, seeds in per_seed.items():
        mean[arm] = []
        for i in range(n):
            reached = [v for c in seeds.values() if i < len(c) and (v := c[i]) is not None]
            mean[arm].append(round(sum(reached) / len(reached), 6) if reached else None)
    return n, mean, per_seed


_drawn: dict[str, str | None] = {}  # SMILES -> data URL or None: each poll shows the same best ones
_DRAWN_KEPT = 1024
_drawn_lock = threading.Lock()


def drawings(smiles: list[str]) -> dict[str, str | None]:
    """2-D drawings as data: URLs for <img> (never inserted as HTML), None for what RDKit cannot
    read (or without RDKit); drawn in the adapters' sandbox (``ui.molecules``), never here."""
    with _drawn_lock:
        missing = [s for s in dict.fromkeys(smiles) if s not in _drawn]
    made = dict(zip(missing, (d.get("image") for d in draw(missing)), strict=True)) if missing else {}
    with _drawn_lock:  # pages poll from several threads at once
        _drawn.update(made)
        while len(_drawn) > _DRAWN_KEPT:
            _drawn.pop(next(iter(_drawn)), None)
        return {s: made[s] if s in made else _drawn.get(s) for s in smiles}


def top_molecules(sims: list[Sim]) -> list[dict[str, Any]]:
    """The best distinct molecules found, each with where it was found first at its best."""
    best: dict[str, tuple[float, Sim]] = {}
    for s in sims:
        if s.objective is not None and (s.smiles not in best or s.objective > best[s.smiles][0]):
            best[s.smiles] = (s.objective, s)
    ranked = sorted(best.values(), key=lambda pair: pair[0], reverse=True)[:TOP_MOLECULES]
    images = drawings([s.smiles for _, s in ranked])
    return [
        {
            "smiles": s.smiles,
            "objective": round(objective, 6),
            "arm": s.arm,
            "seed": s.seed,
            "source": s.source,
            "image": images[s.smiles],
        }
        for objective, s in ranked
    ]


def run_data(run: Run) -> dict[str, Any]:
    """The JSON the campaign page's script draws (and polls while the run has no run.json)."""
    n, mean, per_seed = best_series(run.sims)
    errors = [{"arm": s.arm, "seed": s.seed, "index": s.index, "error": s.error} for s in run.sims if s.error]
    record = None
    if run.record is not None:
        keys = ("seeds", "settings", "ledger_usage", "results", "model", "seconds")
        record = {key: run.record.get(key) for key in keys}
    return {
        "name": run.name,
        "finished": run.record is not None,
        "simulations": len(run.sims),
        "failures": run.failures,
        "best": run.best,
        "arms": sorted(mean),
        "x": list(range(1, n + 1)),
        "best_so_far": mean,
        "best_so_far_by_seed": per_seed,
        "top": top_molecules(run.sims),
        "errors": errors[-10:],  # the latest failures, for the page's table
        "run": record,
    }


def campaign_principal(folder: Path) -> tuple[str, float] | None:
    """Who runs the campaign and since when, from the ``campaign.json`` it writes as it starts."""
    file = folder / "campaign.json"
    try:
        if file.stat().st_size > MAX_CAMPAIGN_JSON:
            return None
        started = json.loads(file.read_text())
        return str(started["principal"]), float(started["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def may_see_usage(viewer: Principal, campaign_principal: str | None) -> bool:
    """A campaign's TPM calls and costs (live, or the ledger totals in run.json) are the
    campaign's principal's and the admins' to see; the run's science is every viewer's."""
    return viewer.can("admin") or (campaign_principal is not None and viewer.name == campaign_principal)


def live_usage(bench: Workbench, folder: Path, viewer: Principal) -> list[dict[str, Any]] | None:
    """While a run goes on: its TPM calls and their cost so far, from this gateway's ledger, for
    the principal the campaign names in ``campaign.json`` (written when it starts), since then.
    Shown to that principal and to admins only; None otherwise, or without ``campaign.json``."""
    who = campaign_principal(folder)
    if who is None or not may_see_usage(viewer, who[0]):
        return None
    who, since = who
    bench.gw.ledger.flush()
    return bench.gw.access.usage("principal", who, since=since, charges=True)


def summary(run: Run) -> dict[str, Any]:
    return {
        "id": run.id,
        "name": run.name,
        "folder": str(run.path.parent),
        "finished": run.record is not None,
        "simulations": len(run.sims),
        "failures": run.failures,
        "best": run.best,
        "arms": sorted({s.arm for s in run.sims}),
    }


# -- routes ---------------------------------------------------------------------------------------


def routes(bench: Workbench) -> list[Any]:
    from tpmflow.ui.pages import SECURITY_HEADERS  # here, not at the top: pages imports this module

    def dirs() -> list[str]:
        return list(bench.gw.cfg.gateway.campaign_dirs)

    async def lookup(request: Request) -> Run | None:
        rid = request.path_params["run"]
        if not _RUN_ID.match(rid):
            return None
        runs = await asyncio.to_thread(find_runs, dirs())
        path = runs.get(rid)
        return None if path is None else await asyncio.to_thread(read_run, rid, path)

    def not_found() -> Response:
        return bench._render("error.html", status=404, message="No such campaign run is listed here.")

    async def campaigns(request: Request) -> Response:
        session = await bench._session(request)
        if session is None:
            return bench._to_signin(request)
        principal, csrf = session

        def read_all() -> list[dict[str, Any]]:
            return [summary(read_run(rid, path)) for rid, path in find_runs(dirs()).items()]

        runs = await asyncio.to_thread(read_all)
        return bench._page("campaigns.html", principal, csrf, "campaigns", runs=runs, configured=bool(dirs()))

    async def campaign(request: Request) -> Response:
        session = await bench._session(request)
        if session is None:
            return bench._to_signin(request)
        principal, csrf = session
        run = await lookup(request)
        if run is None:
            return not_found()
        return bench._page("campaign.html", principal, csrf, "campaigns", run=summary(run))

    async def data(request: Request) -> Response:
        session = await bench._session(request)
        if session is None:
            return bench._to_signin(request)
        run = await lookup(request)
        if run is None:
            return JSONResponse({"error": "no such campaign run is listed here"}, status_code=404)
        payload = await asyncio.to_thread(run_data, run)  # RDKit drawing, on a thread too
        if not payload["finished"]:
            payload["live_usage"] = await asyncio.to_thread(live_usage, bench, run.path, session[0])
        elif payload["run"] is not None:
            who = await asyncio.to_thread(campaign_principal, run.path)
            if not may_see_usage(session[0], who[0] if who else None):
                payload["run"]["ledger_usage"] = None  # the science stays; the bill is not theirs
        return JSONResponse(payload, headers=SECURITY_HEADERS)

    return [
        Route("/ui/campaigns", campaigns, methods=["GET"]),
        Route("/ui/campaigns/{run}", campaign, methods=["GET"]),
        Route("/ui/campaigns/{run}/data", data, methods=["GET"]),
    ]
