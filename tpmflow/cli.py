"""The ``tpmflow`` command."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tpmflow import __version__

if TYPE_CHECKING:
    from tpmflow.access.slo import Percentiles, SloReport

app = typer.Typer(
    help="tpmflow: a co-located vLLM model pool for Parsl / Colmena science campaigns.",
    no_args_is_help=True,
    add_completion=False,
)
models_app = typer.Typer(help="Build and list the locally built models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
adapters_app = typer.Typer(help="Installed domain adapters and their trained heads.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")
tokens_app = typer.Typer(help="Create, list and revoke bearer tokens of principals.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
allocations_app = typer.Typer(
    help="Projects' allocations of service units (SU) for a period, and per-principal caps.", no_args_is_help=True
)
app.add_typer(allocations_app, name="allocations")
knowledge_app = typer.Typer(
    help="Knowledge collections in a running pool (items embedded by the pool, searched by similarity).",
    no_args_is_help=True,
)
app.add_typer(knowledge_app, name="knowledge")
site_app = typer.Typer(help="Cluster site configs: what they make Parsl and vLLM run.", no_args_is_help=True)
app.add_typer(site_app, name="site")
slo_app = typer.Typer(
    help="Service-level objectives: service classes' targets against the ledger.", no_args_is_help=True
)
app.add_typer(slo_app, name="slo")
workshop_app = typer.Typer(help="Workshops: participant tokens, a service class and an allocation in one step.")
app.add_typer(workshop_app, name="workshop")
console = Console()

ConfigOption = Annotated[
    str | None, typer.Option("--config", help="Pool config whose database_url to use (default: local SQLite).")
]
DatabaseOption = Annotated[str | None, typer.Option("--database-url", help="SQLAlchemy URL of the ledger.")]


def _access(config: str | None, database_url: str | None):  # type: ignore[no-untyped-def]
    from tpmflow.access import AccessDB
    from tpmflow.config import PoolConfig

    url = database_url or (PoolConfig.from_yaml(config).database_url if config else None)
    return AccessDB(url)


@app.command()
def serve(
    config: Annotated[str, typer.Option("--config", help="Pool config YAML.")] = "configs/local.yaml",
    layout: Annotated[
        str | None, typer.Option(help="One of the config's layouts (e.g. `big`: one replica over several nodes).")
    ] = None,
    replicas: Annotated[int | None, typer.Option(help="Override the number of replicas.")] = None,
    show_internals: Annotated[
        bool, typer.Option(help="Also print replica URLs and the pool secret (operators' debugging and benchmarks).")
    ] = False,
) -> None:
    """Start a pool (gateway + replicas) and serve until Ctrl-C; prints the URL and a token."""
    import signal
    import threading

    from tpmflow.config import PoolConfig
    from tpmflow.pool import Pool

    cfg = PoolConfig.from_yaml(config, layout)
    if replicas is not None:
        cfg.replicas = replicas
    if cfg.launcher.kind == "parsl":  # replicas are Parsl apps: submit the replica executor's blocks first
        import parsl

        from tpmflow.colmena import split_site

        pool_parsl, _ = split_site(config, layout=layout)  # the simulations' executors are the campaign's
        parsl.load(pool_parsl)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with console.status(f"starting {cfg.replicas} replica(s) of {cfg.model_name()}…"):
        pool = Pool(cfg)
        pool.__enter__()
    try:
        console.print(
            f"[bold green]tpmflow pool ready[/] at {pool.url}  (model {cfg.model_name()}, {cfg.replicas} replica(s))"
        )
        console.print(f"admin token (shown once): {pool.token}")
        console.print(f"workbench: {pool.url}/ui  (sign in with a token)")
        console.print(
            f"try: curl -s {pool.url}/v1/completions -H 'Authorization: Bearer {pool.token}' "
            f'-H \'Content-Type: application/json\' -d \'{{"prompt": "C", "max_tokens": 16}}\''
        )
        print(f"TPMFLOW_URL={pool.url}", flush=True)
        print(f"TPMFLOW_TOKEN={pool.token}", flush=True)
        if show_internals:
            urls = ",".join(r.info.url for r in pool.gateway.registry.live() if r.info.task == "generate")
            print(f"TPMFLOW_REPLICA_URLS={urls}", flush=True)
            print(f"TPMFLOW_POOL_SECRET={pool.secret}", flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping the pool…")
        pool.stop()


@app.command()
def gateway(
    config: Annotated[str, typer.Option("--config", help="The pool's config YAML (the same file as `tpmflow serve`).")],
    layout: Annotated[
        str | None, typer.Option(help="One of the config's layouts (e.g. `big`: one replica over several nodes).")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Interface to listen on (default: the config's gateway.host).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: the config's gateway.port).")] = None,
    workers: Annotated[int, typer.Option(help="Gateway processes on this port.")] = 1,
) -> None:
    """Serve one more gateway of a running pool (no replicas): it shares the pool's database and secret
    (TPMFLOW_POOL_SECRET), and the replicas heartbeat to it when the pool's `gateway.peers` lists it."""
    import os

    from tpmflow.config import PoolConfig
    from tpmflow.gateway.serve import CONFIG_ENV, WORKERS_ENV, main
    from tpmflow.protocol import SECRET_ENV

    if not os.environ.get(SECRET_ENV):
        console.print(f"[red]{SECRET_ENV} is not set[/]: give every gateway of the pool the same secret")
        raise typer.Exit(2)
    cfg = PoolConfig.from_yaml(config, layout)
    if not (port or cfg.gateway.port):
        console.print("[red]give the gateway a fixed port[/] (--port or gateway.port): clients and replicas need it")
        raise typer.Exit(2)
    if cfg.database_url is None or cfg.database_url.startswith("sqlite"):
        console.print("[yellow]warning:[/] gateways on several hosts need one shared database (PostgreSQL)")
    os.environ[CONFIG_ENV] = cfg.model_dump_json()
    os.environ[WORKERS_ENV] = str(workers)
    bind = host or cfg.gateway.host
    main(["--host", bind, "--port", str(port or cfg.gateway.port), "--workers", str(workers)])


UrlOption = Annotated[str | None, typer.Option("--url", envvar="TPMFLOW_URL", help="The pool's gateway.")]
TokenOption = Annotated[str | None, typer.Option("--token", envvar="TPMFLOW_TOKEN", help="Your token.")]


@contextmanager
def _pool_client(url: str | None, token: str | None) -> Iterator[Any]:
    from tpmflow.client import Client
    from tpmflow.errors import TpmflowError

    if not url or not token:
        Console(stderr=True).print("[red]give the pool:[/] --url and --token, or TPMFLOW_URL and TPMFLOW_TOKEN")
        raise typer.Exit(2)
    try:
        with Client(url, token) as client:
            yield client
    except TpmflowError as exc:
        Console(stderr=True).print(f"[red]{type(exc).__name__}:[/] {exc}")
        raise typer.Exit(1) from None


def _collection_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("collection", "project", "visibility", "items", "embedder", "stored")
    for c in rows:
        e = c["embedder"]
        what = e["adapter"] or ("text, text embedder" if e.get("served_by") == "text-embedder" else "text")
        source = f"{what}, {e['pooling']}, {e['model'][:19]}, dim {e['dim']}"
        table.add_row(c["name"], c["project"], c["visibility"], str(c["items"]), source, f"{c['stored_bytes']:,} B")
    return table


@knowledge_app.command("list")
def knowledge_list(url: UrlOption = None, token: TokenOption = None) -> None:
    """The collections you may read."""
    with _pool_client(url, token) as client:
        console.print(_collection_table(client.collections()))


@knowledge_app.command("show")
def knowledge_show(name: str, url: UrlOption = None, token: TokenOption = None) -> None:
    """One collection: owner, sharing, embedder, size, metadata fields."""
    with _pool_client(url, token) as client:
        info = client.knowledge(name).info()
    console.print(_collection_table([info]))
    console.print(f"shared with: {', '.join(info['shared_with']) or '-'}; fields: {', '.join(info['fields']) or '-'}")


@knowledge_app.command("create")
def knowledge_create(
    name: str,
    adapter: Annotated[str | None, typer.Option(help="The adapter its items go through (none: text).")] = None,
    pooling: Annotated[str, typer.Option(help="mean or last.")] = "mean",
    visibility: Annotated[str, typer.Option(help="private, shared or public.")] = "private",
    via: Annotated[
        str | None,
        typer.Option(help="model or text-embedder (default: text goes to the pool's text embedder if it has one)."),
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Make a collection embedded by the model version the pool serves now (or its text embedder)."""
    with _pool_client(url, token) as client:
        console.print(_collection_table([client.knowledge(name).create(adapter, pooling, visibility, via=via)]))


@knowledge_app.command("add")
def knowledge_add(
    name: str,
    path: Annotated[
        Path,
        typer.Argument(
            help="A CSV with an `item` column (other columns: metadata), a Markdown file (one item a section), "
            "or one item a line."
        ),
    ],
    batch: Annotated[int, typer.Option(help="Items per request.")] = 128,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Add the items of a file, embedded by the pool; an item the adapter refuses is reported, the rest added."""
    import csv

    from tqdm import tqdm

    from tpmflow.knowledge.sources import markdown_sections, number

    text = path.read_text()
    if path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if rows and "item" not in rows[0]:
            Console(stderr=True).print(f"[red]{path}[/] has no `item` column")
            raise typer.Exit(2)
        items = [r.pop("item") for r in rows]
        metadata: list[dict[str, Any]] | None = [{k: number(v) for k, v in r.items()} for r in rows]
    elif path.suffix in (".md", ".markdown"):
        sections = list(markdown_sections(path))
        items, metadata = [item for item, _ in sections], [meta for _, meta in sections]
    else:
        items, metadata = [line for line in text.splitlines() if line.strip()], None
    added = refused = 0
    with _pool_client(url, token) as client, tqdm(total=len(items), unit="item", desc=f"adding to {name}") as bar:
        collection = client.knowledge(name)
        for start in range(0, len(items), batch):
            chunk = slice(start, start + batch)
            result = collection.add(items[chunk], metadata[chunk] if metadata is not None else None)
            for error in result.errors:
                bar.write(f"item {start + (error.item or 0)} refused: {error}")
            refused += len(result.errors)
            added += len(result.ids) - len(result.errors)
            bar.update(len(result.ids))
    console.print(f"added {added}, refused {refused}")


@knowledge_app.command("reembed")
def knowledge_reembed(
    name: str,
    version: Annotated[str, typer.Option(help="The model version to re-embed for: a content hash or a prefix.")] = "",
    batch: Annotated[int, typer.Option(help="Items per step.")] = 256,
    cancel: Annotated[bool, typer.Option(help="Stop a re-embedding under way and drop its new vectors.")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Re-embed a collection for another model version the pool serves; searches use the old
    vectors until every item has its new one, then the new ones are swapped in at once."""
    from tqdm import tqdm

    with _pool_client(url, token) as client:
        collection = client.knowledge(name)
        if cancel:
            console.print("cancelled" if collection.cancel_reembed() else f"{name} was not being re-embedded")
            return
        if not version:
            Console(stderr=True).print("give --version (a content hash or a prefix of one the pool serves)")
            raise typer.Exit(2)
        with tqdm(unit="item", desc=f"re-embedding {name}") as bar:

            def step(answer: dict[str, Any]) -> None:
                bar.total = answer["embedded"] + answer["remaining"] + bar.n
                bar.update(answer["embedded"])

            done = collection.reembed(version, batch=batch, progress=step)
    console.print(f"{name}: {done['items']} items now embedded by {done['embedder']['model'][:19]}")


@knowledge_app.command("search")
def knowledge_search(
    name: str,
    queries: Annotated[list[str], typer.Argument(help="Items to find neighbours of.")],
    k: Annotated[int, typer.Option(help="Neighbours per query.")] = 5,
    where: Annotated[list[str] | None, typer.Option("--filter", help="field=value (repeatable).")] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """The nearest items of each query, by cosine similarity of the pool's embeddings."""
    from tpmflow.knowledge.sources import number

    filters = {f.split("=", 1)[0]: number(f.split("=", 1)[1]) for f in where or [] if "=" in f} or None
    with _pool_client(url, token) as client:
        results = client.knowledge(name).search(queries, k=k, filter=filters)
    for query, hits in zip(queries, results, strict=True):
        table = Table("id", "score", "item", "metadata", title=f"nearest to {query}")
        for h in hits:
            table.add_row(str(h.id), f"{h.score:.3f}", str(h.item), json.dumps(h.metadata))
        console.print(table)


@knowledge_app.command("share")
def knowledge_share(
    name: str,
    project: Annotated[list[str] | None, typer.Option("--project", help="Share read-only with (repeatable).")] = None,
    public: Annotated[bool | None, typer.Option("--public/--private", help="Open to every principal, or not.")] = None,
    revoke: Annotated[list[str] | None, typer.Option("--revoke", help="Stop sharing with (repeatable).")] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Share a collection read-only with other projects, stop sharing, or make it public (or not)."""
    with _pool_client(url, token) as client:
        console.print(_collection_table([client.knowledge(name).share(project, public, revoke)]))


@knowledge_app.command("drop")
def knowledge_drop(name: str, url: UrlOption = None, token: TokenOption = None) -> None:
    """Delete a collection and every item in it."""
    with _pool_client(url, token) as client:
        client.knowledge(name).drop()
    console.print(f"dropped {name}")


@site_app.command("render")
def site_render(
    config: Annotated[str, typer.Argument(help="A site config (a pool config with a parsl: section).")],
    layout: Annotated[str | None, typer.Option(help="One of its layouts, e.g. big.")] = None,
    nodes: Annotated[
        str, typer.Option(help="Host names of one block, comma-separated, as the scheduler would list them.")
    ] = "127.0.0.1,127.0.0.2",
) -> None:
    """Print the batch scripts a site submits and each replica's node commands, submitting nothing."""
    from tpmflow.parsl import load_site
    from tpmflow.parsl.render import describe, render_site

    try:
        rendered = render_site(load_site(config, layout), [n.strip() for n in nodes.split(",") if n.strip()])
    except ValueError as exc:
        Console(stderr=True).print(f"[red]site render:[/] {exc}")
        raise typer.Exit(2) from None
    print(describe(rendered))


@tokens_app.command("create")
def tokens_create(
    principal: Annotated[str, typer.Argument(help="Principal name (created if new).")],
    project: Annotated[str | None, typer.Option(help="Project that is charged (new principals: default).")] = None,
    permissions: Annotated[
        str | None, typer.Option(help="Comma-separated: generate, embed, probe, admin (new: generate,embed).")
    ] = None,
    service_class: Annotated[
        str | None, typer.Option(help="Scheduling class from the pool config (new: interactive).")
    ] = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Create a token for a principal; the token is printed once and stored only as a hash."""
    access = _access(config, database_url)
    perms = {p.strip() for p in permissions.split(",") if p.strip()} if permissions is not None else None
    access.ensure_principal(principal, project, perms, service_class)
    print(access.create_token(principal))


@tokens_app.command("list")
def tokens_list(config: ConfigOption = None, database_url: DatabaseOption = None) -> None:
    """List tokens by prefix with their principal, project, permissions and state."""
    import datetime as dt

    table = Table(title="tokens")
    table.add_column("prefix", no_wrap=True, min_width=10)
    for col in ("principal", "project", "permissions", "class", "created", "state"):
        table.add_column(col)
    for t in _access(config, database_url).list_tokens():
        created = dt.datetime.fromtimestamp(t["created"]).strftime("%Y-%m-%d %H:%M")
        table.add_row(
            t["prefix"],
            t["principal"],
            t["project"],
            t["permissions"],
            t["service_class"],
            created,
            "[red]revoked[/]" if t["revoked"] else "active",
        )
    console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    token: Annotated[str, typer.Argument(help="The token, or the prefix `tokens list` shows.")],
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Revoke a token; requests with it get 401 from then on."""
    n = _access(config, database_url).revoke(token)
    if n == 0:
        console.print(f"[red]no token matches {token!r}[/]")
        raise typer.Exit(1)
    console.print(f"revoked {n} token(s)")


def _when(value: str | None) -> float | None:
    """A time given as seconds since the epoch or ISO 8601 (``2025-01-31``, ``2025-01-31T12:00``,
    local time unless it names its zone)."""
    import datetime as dt

    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r} is neither epoch seconds nor an ISO 8601 date/time") from exc


def _date(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d")


SinceOption = Annotated[str | None, typer.Option("--since", help="Only rows from this time on (ISO 8601 or epoch s).")]
UntilOption = Annotated[str | None, typer.Option("--until", help="Only rows before this time (ISO 8601 or epoch s).")]


@app.command()
def usage(
    by: Annotated[str, typer.Option(help="Group by 'principal' or 'project'.")] = "principal",
    since: SinceOption = None,
    until: UntilOption = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Requests, tokens, payload bytes and service units (SU) from the ledger, per principal or project."""
    from tpmflow.access.db import USAGE_COLUMNS

    if by not in ("principal", "project"):
        raise typer.BadParameter("--by is 'principal' or 'project'")
    rows = _access(config, database_url).usage(by=by, since=_when(since), until=_when(until), charges=True)
    period = "" if since is None and until is None else f" ({since or '…'} to {until or 'now'})"
    table = Table(title=f"usage by {by}{period}")
    for col in (by, "requests", "prompt tokens", "output tokens", "bytes in", "bytes out", "activation bytes", "SU"):
        table.add_column(col, justify="right" if col != by else "left")
    for r in rows:
        table.add_row(
            str(r[by]),
            *(f"{r[k]:,}" for k in USAGE_COLUMNS),
            f"{r['charge_su']:,.4f}",
        )
    console.print(table)


def _duration(value: str) -> float:
    """Seconds in ``90``, ``90s``, ``30m``, ``1h``, ``2d`` or ``1w``."""
    import re

    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", value)
    if found is None or float(found[1]) <= 0:
        raise typer.BadParameter(f"{value!r} is not a duration like 90s, 30m, 1h, 2d or 1w")
    return float(found[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[found[2]]


@slo_app.command("report")
def slo_report(
    config: ConfigOption = None,
    window: Annotated[str, typer.Option(help="How far back from --until (90s, 30m, 1h, 2d, 1w).")] = "1h",
    since: Annotated[str | None, typer.Option("--since", help="Start instead of --until minus --window.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="End (ISO 8601 or epoch s; default now).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    database_url: DatabaseOption = None,
) -> None:
    """Each service class's SLO targets against the ledger over a window: TTFT and latency
    percentiles, output tokens/s, requests and error rate, and MET / MISSED."""
    import time

    from tpmflow.access.slo import slo_report as measure
    from tpmflow.config import PoolConfig

    pool = PoolConfig.from_yaml(config) if config else PoolConfig.model_validate({"model": ""})
    end = _when(until) or time.time()
    start = _when(since)
    if start is None:
        start = end - _duration(window)
    report = measure(_access(config, database_url).engine, pool.service_classes, start, end)
    if as_json:
        print(report.model_dump_json(indent=2))
        return
    _print_slo(report)


def _print_slo(report: SloReport) -> None:
    """Each class with targets: TTFT, latency and tokens/s measured, each target with its verdict."""
    import datetime as dt

    from rich import box

    styles = {"met": "green", "missed": "red", "no data": "yellow"}

    def when(ts: float) -> str:
        return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")

    def verdict(v: str) -> str:
        return f"[{styles[v]}]{v.upper()}[/]" if v in styles else v

    def percentiles(p: Percentiles) -> str:
        return "—" if p.p50 is None else f"{p.p50:.0f} / {p.p95:.0f} / {p.p99:.0f}"

    with_targets = [c for c in report.classes if c.checks]
    if not with_targets:
        console.print(
            "no service class has SLO targets: set ttft_p95_ms, latency_p95_ms or min_tokens_per_s "
            "under service_classes in the pool config (--config)"
        )
        return
    table = Table(
        title=f"SLOs {when(report.since)} to {when(report.until)}",
        caption="TTFT and latency in ms: p50 / p95 / p99, targets on p95.  "
        + "  ".join(f"{c.service_class} {verdict(c.verdict)}" for c in with_targets),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for col in ("class", "requests", "errors", "measure", "measured", "target", "verdict"):
        table.add_column(
            col, justify="left" if col in ("class", "measure") else "right", no_wrap=col in ("class", "measured")
        )
    for c in with_targets:
        checks = {str(k.name): k for k in c.checks}
        errors = "—" if c.error_rate is None else f"{c.error_rate:.1%}"
        tokens_per_s = "—" if c.tokens_per_s is None else f"{c.tokens_per_s:,.1f}"
        lines = (
            ("TTFT", percentiles(c.ttft_ms), "ttft_p95_ms", "≤"),
            ("latency", percentiles(c.latency_ms), "latency_p95_ms", "≤"),
            ("tokens/s", tokens_per_s, "min_tokens_per_s", "≥"),
        )
        for i, (measure, measured, name, sign) in enumerate(lines):
            check = checks.get(name)
            table.add_row(
                c.service_class if i == 0 else "",
                f"{c.requests:,}" if i == 0 else "",
                errors if i == 0 else "",
                measure,
                measured,
                "—" if check is None else f"{sign} {check.target:,g}",
                "—" if check is None else verdict(check.verdict),
                end_section=i == len(lines) - 1,
            )
    console.print(table)


@workshop_app.command("open")
def workshop_open(
    name: Annotated[str, typer.Argument(help="Workshop name: its project, and its participants' prefix.")],
    participants: Annotated[int, typer.Option("--participants", "-n", help="How many participants.")],
    su: Annotated[float, typer.Option("--su", help="Service units for the whole workshop (split in equal caps).")],
    service_class: Annotated[str, typer.Option("--class", help="Service class from the pool config.")] = "interactive",
    permissions: Annotated[str, typer.Option(help="Comma-separated permissions.")] = "generate,embed,probe",
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Open a workshop: N principals with a token each, one class, one allocation with equal caps.
    The tokens are printed once (the same as the workbench's workshop page makes)."""
    from tpmflow.access.workshop import open_workshop
    from tpmflow.config import PoolConfig

    classes = set(PoolConfig.from_yaml(config).service_classes) if config else None
    perms = frozenset(p.strip() for p in permissions.split(",") if p.strip())
    made = open_workshop(_access(config, database_url), name, participants, service_class, su, perms, classes)
    table = Table(title=f"workshop {name}: {participants} participants, {su:g} SU ({su / participants:g} each)")
    table.add_column("principal", no_wrap=True)
    table.add_column("token", no_wrap=True)
    for p in made:
        table.add_row(p.principal, p.token)
    console.print(table)


@allocations_app.command("create")
def allocations_create(
    project: Annotated[str, typer.Argument(help="Project whose principals draw on it.")],
    su: Annotated[float, typer.Option("--su", help="Service units granted.")],
    start: Annotated[str | None, typer.Option(help="Start (ISO 8601 or epoch s; default now).")] = None,
    end: Annotated[str | None, typer.Option(help="End, exclusive (default: a year after start).")] = None,
    cap: Annotated[
        list[str] | None, typer.Option("--cap", help="PRINCIPAL=SU: the most one principal may draw (repeatable).")
    ] = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Grant a project SUs for a period; its requests are refused (429) once they are spent."""
    caps: dict[str, float] = {}
    for item in cap or []:
        name, sep, amount = item.partition("=")
        try:
            caps[name.strip()] = float(amount)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise typer.BadParameter(f"--cap takes PRINCIPAL=SU, got {item!r}")
    row = _access(config, database_url).allocations.create(project, su, _when(start), _when(end), caps)
    _print_allocations([row])


@allocations_app.command("show")
def allocations_show(
    project: Annotated[str | None, typer.Argument(help="One project (default: all).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Allocations with their balance, reservations in flight and caps."""
    rows = _access(config, database_url).allocations.show(project)
    if as_json:
        print(json.dumps(rows))
        return
    _print_allocations(rows)


@allocations_app.command("topup")
def allocations_topup(
    project: Annotated[str, typer.Argument(help="Project to top up.")],
    su: Annotated[float, typer.Option("--su", help="Service units to add.")],
    allocation_id: Annotated[int | None, typer.Option("--id", help="Allocation id (default: the current one).")] = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Add SUs to a project's current allocation."""
    row = _access(config, database_url).allocations.topup(project, su, allocation_id)
    _print_allocations([row])


@allocations_app.command("cap")
def allocations_cap(
    project: Annotated[str, typer.Argument(help="Project of the allocation.")],
    principal: Annotated[str, typer.Argument(help="Principal to cap.")],
    su: Annotated[float | None, typer.Option("--su", help="The most this principal may draw (omit to lift).")] = None,
    allocation_id: Annotated[int | None, typer.Option("--id", help="Allocation id (default: the current one).")] = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Cap what one principal may draw from its project's allocation (or lift the cap)."""
    access = _access(config, database_url)
    access.allocations.set_cap(project, principal, su, allocation_id)
    _print_allocations(access.allocations.show(project))


@allocations_app.command("sweep")
def allocations_sweep(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Give back expired reservations (a gateway crashed before settling them). Running gateways
    do this on their own; safe to run alongside them: each is released once."""
    released = _access(config, database_url).allocations.sweep()
    if as_json:
        print(json.dumps(released))
        return
    import datetime as dt

    table = Table(title=f"released {len(released)} expired reservation(s) (SU)")
    for col in ("id", "project", "principal", "su", "gateway", "expired"):
        table.add_column(col, justify="right" if col == "su" else "left")
    for r in released:
        expired = dt.datetime.fromtimestamp(r["expires"]).isoformat(sep=" ", timespec="seconds")
        table.add_row(str(r["id"]), r["project"], r["principal"], f"{r['su']:,.6f}", r["gateway"], expired)
    console.print(table)


def _print_allocations(rows: list[dict[str, Any]]) -> None:
    table = Table(title="allocations (SU)")
    for col in ("id", "project", "period", "state", "granted", "spent", "reserved", "balance", "caps"):
        table.add_column(col, justify="right" if col in ("granted", "spent", "reserved", "balance") else "left")
    for r in rows:
        caps = ", ".join(f"{p} {c['spent_su']:,.2f}/{c['cap_su']:,.2f}" for p, c in r["caps"].items())
        table.add_row(
            str(r["id"]),
            r["project"],
            f"{_date(r['starts'])}..{_date(r['ends'])}",
            "[green]active[/]" if r["active"] else "inactive",
            f"{r['granted_su']:,.2f}",
            f"{r['spent_su']:,.2f}",
            f"{r['reserved_su']:,.2f}",
            f"{r['balance_su']:,.2f}",
            caps,
        )
    console.print(table)


@app.command()
def version() -> None:
    """Print tpmflow's version."""
    console.print(f"tpmflow {__version__}")


@app.command()
def doctor(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Report what is installed and usable here; exit 1 when something required is missing."""
    from tpmflow.doctor import run_checks, verdict

    checks = run_checks()
    ready, line = verdict(checks)
    if as_json:
        print(json.dumps({"ready": ready, "verdict": line, "checks": [c.__dict__ for c in checks]}))
    else:
        table = Table(title="tpmflow doctor", show_lines=False)
        for col in ("", "component", "status", "fix"):
            table.add_column(col)
        for c in checks:
            mark = "[green]ok[/]" if c.ok else ("[red]MISSING[/]" if c.required else "[yellow]absent[/]")
            table.add_row(mark, c.name, c.detail, c.fix if not c.ok else "")
        console.print(table)
        console.print(f"[bold {'green' if ready else 'red'}]{line}[/]")
    raise typer.Exit(0 if ready else 1)


@app.command()
def plan(
    hardware: Annotated[
        str,
        typer.Option(
            "--hardware",
            "-H",
            help="a100-40gb (polaris), max1550-tile (aurora), h100-80gb, h200-141gb, "
            "a100-80gb, mi250x-gcd (frontier), cpu-node, local.",
        ),
    ],
    model: Annotated[str | None, typer.Option(help="A config.json, a model folder or a tpmflow model name.")] = None,
    arch: Annotated[
        str | None, typer.Option(help="Explicit numbers instead: 'layers=80,hidden=8192,heads=64,kv_heads=8,...'.")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option("--config", help="A pool config: its model, settings, prices; warns if its shape fails."),
    ] = None,
    layout: Annotated[
        str | None, typer.Option(help="One of the config's layouts (e.g. `big`: one replica over several nodes).")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="bf16, fp16, fp8, int8, int4, fp32 (default: the config's).")
    ] = None,
    context: Annotated[int | None, typer.Option(help="Tokens per sequence, vLLM's max_model_len.")] = None,
    concurrent: Annotated[int, typer.Option(help="Full-context sequences the pool holds at once.")] = 1,
    tokens_per_s: Annotated[float, typer.Option(help="Output tokens/s the pool must sustain.")] = 0.0,
    replica_sequences: Annotated[int, typer.Option(help="Full-context sequences each replica must hold.")] = 1,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt tokens per request (priced).")] = 0,
    output_tokens: Annotated[int, typer.Option(help="Output tokens per request.")] = 256,
    probe_layers: Annotated[int | None, typer.Option(help="Probe traffic: layers captured per request.")] = None,
    probe_sites: Annotated[int, typer.Option(help="Probe traffic: sites per layer.")] = 1,
    probe_positions: Annotated[int | None, typer.Option(help="Probe traffic: positions per request.")] = None,
    probe_rate: Annotated[float, typer.Option(help="Probe traffic: requests per second.")] = 0.0,
    gpu_memory_utilization: Annotated[float | None, typer.Option(help="vLLM's, default 0.9.")] = None,
    kv_cache_dtype: Annotated[
        str | None, typer.Option(help="vLLM's --kv-cache-dtype (default: compute dtype).")
    ] = None,
    max_nodes: Annotated[int, typer.Option(help="Largest replica considered, in nodes.")] = 16,
    efficiency: Annotated[float | None, typer.Option(help="Fraction of peak bandwidth decode reaches.")] = None,
    service_class: Annotated[str, typer.Option(help="Service class whose prices apply.")] = "interactive",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Plan a pool for a large model: replica shape, replicas, decode throughput, probe traffic, SUs per hour."""
    options = {k: v for k, v in locals().items() if k != "as_json"}
    from tpmflow.planning import PlanRequest, render, run

    try:
        result = run(PlanRequest(**options))
    except ValueError as exc:
        Console(stderr=True).print(f"[red]plan:[/] {exc}")
        raise typer.Exit(2) from None
    if as_json:
        print(result.to_json())
    else:
        render(result, console)


@models_app.command("build-tiny")
def build_tiny(
    force: Annotated[bool, typer.Option(help="Rebuild even if it exists.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Build the random-weight tiny Llama used by tests (seconds)."""
    from tpmflow.models.catalog import TINY_MODEL
    from tpmflow.models.tiny import build_tiny as build

    _build_or_skip(TINY_MODEL, force, lambda: build(seed=seed, force=force))


@models_app.command("build-demo")
def build_demo(
    force: Annotated[bool, typer.Option(help="Rebuild even if it exists.")] = False,
    seed: Annotated[int, typer.Option(help="Training seed (the held-out split is fixed).")] = 0,
    steps: Annotated[int, typer.Option(help="Optimiser steps (~4 minutes on 2 cores at the default).")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Molecules per step.")] = 64,
    samples: Annotated[int, typer.Option(help="Samples drawn through vLLM to score the model (0 skips).")] = 200,
    name: Annotated[str, typer.Option(help="Folder name in the model cache.")] = "smiles-llama",
) -> None:
    """Train the demo SMILES language model on RDKit's NCI set and score its samples through vLLM."""
    from tpmflow.models.demo import FLOORS, TrainSettings
    from tpmflow.models.demo import build_demo as build

    def run() -> None:
        path, card = build(
            name=name,
            settings=TrainSettings(steps=steps, batch_size=batch_size, seed=seed),
            samples=samples,
            force=force,
        )
        m = card.metrics or {}
        table = Table(title=f"{name}: {card.parameters:,} parameters, {card.content_hash[:19]}…")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_column("floor", justify="right")
        table.add_row("held-out loss (nats/token)", f"{m['heldout_loss']:.3f}", f"< {m['unigram_heldout_loss']:.3f}")
        table.add_row("unigram baseline loss", f"{m['unigram_heldout_loss']:.3f}", "")
        for key, floor in FLOORS.items():
            if key in m:
                ok = m[key] >= floor
                table.add_row(
                    f"{key} ({m['n']} samples, T=1.0)", f"[{'green' if ok else 'red'}]{m[key]:.3f}[/]", f">= {floor}"
                )
        console.print(table)
        if "examples" in m:
            console.print("samples: " + "  ".join(m["examples"][:5]))
        console.print(f"saved to {path}")

    _build_or_skip(name, force, run)


def _build_or_skip(name: str, force: bool, build: object) -> None:
    from tpmflow.models.card import CARD_FILE
    from tpmflow.paths import models_dir

    if (models_dir() / name / CARD_FILE).is_file() and not force:
        console.print(f"{name} already built in {models_dir() / name} (use --force to rebuild)")
        return
    build()  # type: ignore[operator]


@models_app.command("list")
def list_models() -> None:
    """List the models in the cache with their identity and quality."""
    from tpmflow.models.catalog import list_models as find
    from tpmflow.paths import models_dir

    found = find()
    if not found:
        console.print(f"no models in {models_dir()}; run `tpmflow models build-tiny` or `build-demo`")
        return
    table = Table(title=f"models in {models_dir()}")
    for col in ("name", "kind", "parameters", "content hash", "quality"):
        table.add_column(col)
    for path, card in found:
        if card is None:
            table.add_row(path.name, "[red]no valid card[/]", "", "", "")
            continue
        m = card.metrics or {}
        quality = ", ".join(f"{k} {m[k]:.2f}" for k in ("heldout_loss", "validity", "uniqueness", "novelty") if k in m)
        table.add_row(card.name, card.kind, f"{card.parameters:,}", card.content_hash[:23] + "…", quality or "-")
    console.print(table)


PartsConfigOption = Annotated[
    str | None,
    typer.Option(
        "--config",
        help="Use the parts folder of this pool config (its parts_path; default $TPMFLOW_PARTS, else "
        "$TPMFLOW_HOME/parts).",
    ),
]


@contextmanager
def _parts_of(config: str | None) -> Iterator[Path]:
    """The parts folder of a pool config (else this process's), set for the command's duration."""
    from tpmflow.adapters.parts import pool_parts_dir, use_parts_dir
    from tpmflow.errors import InvalidRequest
    from tpmflow.paths import parts_dir

    folder = pool_parts_dir(config) if config else parts_dir()
    try:
        with use_parts_dir(folder):
            yield folder
    except InvalidRequest as exc:
        if not exc.message.startswith("no part "):
            raise
        # Here the folder is the user's own, so say which it was and how to name the pool's.
        raise InvalidRequest(f"{exc.message}: looked in {folder} (--config POOL.yaml: that pool's parts_path)") from exc


def _shown_metrics(metrics: dict[str, Any]) -> str:
    """A card's numeric metrics, held-out ones first, rounded for a table cell."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    order = sorted(numbers, key=lambda k: (not k.startswith("heldout_"), k))
    return ", ".join(f"{k}={round(numbers[k], 3)}" for k in order) or "-"


@adapters_app.command("list")
def adapters_list(config: PartsConfigOption = None) -> None:
    """Adapters installed here (entry points) and the parts (projectors, heads) trained for them."""
    from tpmflow.adapters import available_adapters
    from tpmflow.adapters.parts import list_parts

    table = Table(title="installed adapters")
    for col in ("name", "package entry point"):
        table.add_column(col)
    for name, ep in sorted(available_adapters().items()):
        table.add_row(name, ep.value)
    console.print(table)
    with _parts_of(config) as folder:
        parts = list_parts(folder)
    table = Table(title=f"trained parts in {folder}")
    for col in ("adapter", "part", "kind", "target", "base model"):
        table.add_column(col, no_wrap=col in ("adapter", "part"))  # names are copied into commands: never cut
    table.add_column("metrics", overflow="fold")  # at 80 columns break the numbers, never drop them
    for card in parts:
        table.add_row(
            card.adapter,
            f"{card.name}@{card.version}",
            card.kind,
            card.target[:30],
            f"{card.base_model} {card.base_content_hash[:19]}",
            _shown_metrics(card.metrics),
        )
    console.print(table if parts else f"no trained parts yet in {folder}")


@adapters_app.command("show")
def adapters_show(
    name: Annotated[str, typer.Argument(help="Adapter name, e.g. smiles.")], config: PartsConfigOption = None
) -> None:
    """An adapter's settings and the cards of its trained parts."""
    from tpmflow.adapters import load_adapter
    from tpmflow.adapters.parts import list_parts

    adapter = load_adapter(name)
    console.print(f"[bold]{adapter.name}[/] {adapter.version} ({adapter.modality}); config {adapter.config()}")
    with _parts_of(config) as folder:
        for card in list_parts(folder):
            if card.adapter == name:
                console.print_json(card.model_dump_json())


@adapters_app.command("fit")
def adapters_fit(
    name: Annotated[str, typer.Argument(help="Adapter name (smiles, pointcloud, beamline).")],
    head: Annotated[str, typer.Option(help="Which head to fit (smiles: tpsa).")] = "tpsa",
    config: Annotated[str, typer.Option("--config", help="Pool config of the core model.")] = "configs/local.yaml",
    version: Annotated[str, typer.Option(help="Version of the new parts.")] = "0.1.0",
    steps: Annotated[int, typer.Option(help="Training steps of a soft-token encoder + projector.")] = 300,
) -> None:
    """Fit an adapter's trained parts against the pool's core model and report the held-out score
    next to its baselines (the adapter's features alone; a random projector)."""
    from importlib.metadata import entry_points

    fits = {ep.name: ep for ep in entry_points(group="tpmflow.fits")}
    if name in fits:
        _fit_soft(name, fits[name].load(), config, version, steps)
        return
    if (name, head) != ("smiles", "tpsa"):
        have = ", ".join(["smiles (--head tpsa)", *sorted(fits)])
        console.print(f"[red]no trainer for head {head!r} of adapter {name!r} (available: {have})[/]")
        raise typer.Exit(2)
    from tpmflow_smiles.tpsa import fit_tpsa_head

    from tpmflow.models.smiles_data import load_split
    from tpmflow.pool import Pool

    split = load_split()  # the demo model's own split: train on its training molecules, test on held-out
    with console.status("starting the pool…"):
        pool = Pool.from_config(config)
        pool.__enter__()
    try:
        with _parts_of(config), pool.client() as client:  # save the head where the replicas look for it
            path, card = fit_tpsa_head(client, split.train, split.heldout, version=version)
    finally:
        pool.stop()
    table = Table(title=f"{card.adapter}/{card.name}@{card.version} on {card.base_model}: held-out R²")
    table.add_column("features")
    table.add_column("R²", justify="right")
    m = card.metrics
    table.add_row("core model embeddings (mean-pooled final states)", f"{m['heldout_r2_core_embeddings']:.3f}")
    table.add_row("Morgan fingerprints alone (no core model)", f"{m['heldout_r2_fingerprints_alone']:.3f}")
    table.add_row("random projector of the fingerprints", f"{m['heldout_r2_random_projector']:.3f}")
    console.print(table)
    console.print(f"{m['n_train']} training / {m['n_heldout']} held-out molecules; saved to {path}")


def _fit_soft(name: str, quality_check: Any, config: str, version: str, steps: int) -> None:
    """Run an adapter's ``tpmflow.fits`` entry point on a pool of ``config`` and print the report."""
    from rich.progress import Progress

    from tpmflow.pool import Pool
    from tpmflow.versioning.checkout import replica_model_dir

    with console.status("starting the pool…"):
        pool = Pool.from_config(config)
        pool.__enter__()
    try:
        # Save the parts where the replicas look for them.
        with _parts_of(config), pool.client() as client, Progress(console=console) as progress:
            task = progress.add_task(f"training {name} encoder + projector through the frozen core", total=steps)

            def tick(step: int, loss: float) -> None:
                progress.update(task, completed=step + 1, description=f"training {name} (loss {loss:.3f})")

            report = quality_check(client, replica_model_dir(pool.cfg), version=version, steps=steps, progress=tick)
    finally:
        pool.stop()
    higher = report.metric == "accuracy"
    table = Table(title=f"{name}: held-out {report.metric} ({'higher' if higher else 'lower'} is better)")
    table.add_column("features")
    table.add_column(report.metric, justify="right")
    x = report.extra
    r2 = (lambda key: f"{x[key]:.3f}") if not higher else None  # regression: R² beside the MAE
    if r2 is not None:
        table.add_column("R²", justify="right")
    rows = [
        (f"core model (head {report.head}, projector {report.projector})", report.core, "core_r2"),
        ("the trained encoder's features alone (no core model)", report.encoder_alone, "encoder_r2"),
        ("random encoder + projector through the core", report.random_projector, "random_r2"),
    ]
    for label, value, key in rows:
        table.add_row(label, f"{value:.3f}", *([r2(key)] if r2 is not None else []))
    for key, value in sorted(x.items()):
        if key.startswith("classical"):
            table.add_row(key.replace("_", " "), f"{value:.3f}", *([""] if r2 is not None else []))
    console.print(table)
    console.print(
        f"{report.n_train} training / {report.n_heldout} held-out items; training took {report.train_seconds:.0f} s"
    )


# -- the model store (tpmflow.versioning) ----------------------------------------------------------

StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store", envvar="TPMFLOW_MODEL_STORE", help="Model store folder (default: $TPMFLOW_HOME/store/models)."
    ),
]


def _store(path: str | None) -> Any:
    from tpmflow.versioning import ModelStore

    return ModelStore(path)


def _short(version: str | None) -> str:
    return version[7:19] if version else "-"


@contextmanager
def _bytes_progress(label: str) -> Iterator[Any]:
    """A rich progress bar fed by the store's (done, total) callback."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


@adapters_app.command("commit")
def adapters_commit(
    adapter: Annotated[str, typer.Argument(help="Adapter name, e.g. pointcloud.")],
    spec: Annotated[str, typer.Argument(help="Part name (its newest version) or name@version.")],
    store: StoreOption = None,
    config: PartsConfigOption = None,
) -> None:
    """Version a trained part (projector or head) in the model store, tagged part.ADAPTER.NAME.VERSION."""
    from tpmflow.versioning.parts import commit_part

    with _parts_of(config):
        console.print(commit_part(adapter, spec, _store(store)))


@adapters_app.command("restore")
def adapters_restore(
    adapter: Annotated[str, typer.Argument(help="Adapter name, e.g. pointcloud.")],
    spec: Annotated[str, typer.Argument(help="name@version of a part committed with `adapters commit`.")],
    store: StoreOption = None,
    config: PartsConfigOption = None,
) -> None:
    """Put a committed part back where replicas look for parts (a machine that never trained it)."""
    from tpmflow.versioning.parts import restore_part

    with _parts_of(config):
        console.print(str(restore_part(adapter, spec, _store(store))))


@models_app.command("commit")
def models_commit(
    directory: Annotated[
        Path, typer.Argument(help="Model folder (safetensors + config + tokenizer); with --lora, the base model's.")
    ],
    message: Annotated[str, typer.Option("-m", "--message", help="What this version is.")],
    lora: Annotated[Path | None, typer.Option(help="A PEFT LoRA folder: store its factors on top of the base.")] = None,
    parent: Annotated[
        str | None, typer.Option(help="Version or tag this one derives from (deltas are taken against it).")
    ] = None,
    author: Annotated[str | None, typer.Option(help="Who commits (default: the login name).")] = None,
    tag: Annotated[str | None, typer.Option(help="Tag the new version.")] = None,
    store: StoreOption = None,
) -> None:
    """Store a model folder as a new version; prints its id (the model's content hash)."""
    import getpass

    models = _store(store)
    before = models.disk_usage()
    with _bytes_progress("commit") as progress:
        version = models.commit(
            directory, message, author or getpass.getuser(), parent=parent, lora=lora, tag=tag, progress=progress
        )
    added = models.disk_usage() - before
    console.print(f"{version}  (+{added / 2**20:.2f} MiB in {models.root})")


@models_app.command("log")
def models_log(
    version: Annotated[
        str | None, typer.Argument(help="Show this version's ancestry (default: every version).")
    ] = None,
    store: StoreOption = None,
) -> None:
    """List versions, newest first, with their tags."""
    models = _store(store)
    tags: dict[str, list[str]] = {}
    for name, target in models.tags.all().items():
        tags.setdefault(target, []).append(name)
    table = Table(title=f"model store {models.root}")
    for col in ("version", "tags", "created", "author", "parent", "encodings", "message"):
        table.add_column(col)
    for m in models.log(version):
        encodings: dict[str, int] = {}
        for record in m.tensors.values():
            encodings[record.encoding] = encodings.get(record.encoding, 0) + 1
        summary = " ".join(f"{k} {n}" for k, n in sorted(encodings.items()))
        table.add_row(
            _short(m.id),
            ",".join(tags.get(m.id, [])),
            m.created[:19].replace("T", " "),
            m.author,
            _short(m.parent),
            summary,
            m.message,
        )
    console.print(table)


@models_app.command("show")
def models_show(
    version: Annotated[str, typer.Argument(help="Version id, unique prefix or tag.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole manifest as JSON.")] = False,
    store: StoreOption = None,
) -> None:
    """One version: its lineage, metrics, files and how each tensor is stored."""
    m = _store(store).show(version)
    if as_json:
        console.print_json(m.to_json().decode())
        return
    console.print(f"[bold]{m.id}[/]  parent {m.parent or '-'}")
    console.print(f"{m.created}  {m.author}: {m.message}")
    if m.metrics:
        console.print("metrics: " + ", ".join(f"{k} {v}" for k, v in m.metrics.items()))
    if m.lora:
        console.print(f"LoRA: {m.lora}")
    console.print("files: " + ", ".join(m.files))
    table = Table(title=f"{len(m.tensors)} tensors, {m.nbytes / 2**20:.2f} MiB")
    for col in ("tensor", "dtype", "shape", "encoding", "depth", "blobs"):
        table.add_column(col)
    for name, r in m.tensors.items():
        table.add_row(name, r.dtype, "x".join(map(str, r.shape)), r.encoding, str(r.depth), str(len(r.blobs)))
    console.print(table)


@models_app.command("diff")
def models_diff(
    a: Annotated[str, typer.Argument(help="From this version.")],
    b: Annotated[str, typer.Argument(help="To this version.")],
    show_all: Annotated[bool, typer.Option("--all", help="List unchanged tensors too.")] = False,
    store: StoreOption = None,
) -> None:
    """Which tensors changed between two versions, and by how much."""
    d = _store(store).diff(a, b)
    table = Table(title=f"{_short(d.a)} -> {_short(d.b)}: {len(d.changed)} of {len(d.tensors)} tensors changed")
    for col in ("tensor", "status", "elements", "fraction changed", "relative L2"):
        table.add_column(col, justify="left" if col in ("tensor", "status") else "right")
    for t in d.tensors if show_all else d.changed:
        rel = "-" if t.relative_l2 is None else f"{t.relative_l2:.3g}"
        table.add_row(t.name, t.status, f"{t.elements:,}", f"{t.fraction_changed:.4f}", rel)
    console.print(table)
    for path, status in d.files.items():
        console.print(f"file {path}: {status}")


@models_app.command("checkout")
def models_checkout(
    version: Annotated[str, typer.Argument(help="Version id, unique prefix or tag.")],
    directory: Annotated[Path, typer.Argument(help="New (or empty) folder to write the model into.")],
    store: StoreOption = None,
) -> None:
    """Write a version out as a model folder that vLLM and transformers load, bit for bit as committed."""
    with _bytes_progress("checkout") as progress:
        path = _store(store).checkout(version, directory, progress=progress)
    console.print(f"checked out to {path}")


@models_app.command("tag")
def models_tag(
    name: Annotated[str, typer.Argument(help="Tag name (letters, digits, '.', '_', '-').")],
    version: Annotated[str, typer.Argument(help="Version id, unique prefix or tag.")],
    force: Annotated[bool, typer.Option(help="Move the tag if it points elsewhere.")] = False,
    store: StoreOption = None,
) -> None:
    """Name a version."""
    target = _store(store).tag(name, version, force=force)
    console.print(f"{name} -> {target}")


@models_app.command("gc")
def models_gc(store: StoreOption = None) -> None:
    """Delete blobs no version references (left by interrupted commits)."""
    report = _store(store).gc()
    console.print(
        f"removed {report.removed_blobs} blobs ({report.freed_bytes / 2**20:.2f} MiB), kept {report.kept_blobs}"
    )


@models_app.command("verify")
def models_verify(
    quick: Annotated[bool, typer.Option(help="Check blobs and references only; do not rebuild tensors.")] = False,
    store: StoreOption = None,
) -> None:
    """Check every blob and rebuild every tensor against its blake3; exits 1 on any problem."""
    report = _store(store).verify(deep=not quick)
    for problem in report.problems:
        console.print(f"[red]{problem}[/]")
    verdict = "[green]ok[/]" if report.ok else f"[red]{len(report.problems)} problem(s)[/]"
    console.print(
        f"{verdict}: {report.versions} versions, {report.blobs} blobs ({report.unreferenced_blobs} unreferenced), "
        f"{report.tensors_rebuilt} tensors rebuilt"
    )
    if not report.ok:
        raise typer.Exit(1)


def main() -> None:
    """Console entry point: tpmflow's own errors print as one line, not a traceback."""
    from tpmflow.errors import TpmflowError

    try:
        app()
    except TpmflowError as exc:
        Console(stderr=True).print(f"[red]{type(exc).__name__}:[/] {exc.message}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
