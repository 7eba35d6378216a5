"""Colmena integration: TPM results as Colmena results, TPM calls as tasks, and the design campaign.

The campaign and the thinker example run as scripts in a child process, as users run them: a
Colmena task server forks, and forking a pytest process that already holds a pool's threads is
not what any campaign does.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from colmena.models.results import Result
from colmena.thinker import agent, result_processor

from tpmflow.colmena import SafePipeQueues, TPMThinker, plain, split_site, tpm_methods

REPO = Path(__file__).resolve().parents[1]


class AskTwice(TPMThinker):
    """Submits one good and one bad call, and holds both answers."""

    def __init__(self, queues: SafePipeQueues, **kwargs: Any) -> None:
        super().__init__(queues, **kwargs)
        self.answers: dict[str, Result] = {}
        self.submit_returned_before_answer = False

    @agent
    def ask(self) -> None:
        self.submit_tpm("generate", "hello", max_tokens=4, temperature=0.0, task_info={"which": "good"})
        self.submit_returned_before_answer = not self.answers
        self.submit_tpm("embed", ["CCO"], adapter="no-such-adapter", task_info={"which": "bad"})

    @result_processor(topic="tpm")
    def receive(self, result: Result) -> None:
        self.answers[result.task_info["which"]] = result


def test_submit_tpm_delivers_answers_and_typed_failures_as_colmena_results(pool: Any) -> None:
    queues = SafePipeQueues(topics=["tpm"])
    thinker = AskTwice(queues, url=pool.url, token=pool.token)
    thinker.start()
    thinker.join(timeout=120)
    assert not thinker.is_alive(), "the thinker waits for its TPM calls, then ends"
    good, bad = thinker.answers["good"], thinker.answers["bad"]
    assert good.success and good.method == "tpm.generate" and good.value.usage["completion_tokens"] == 4
    assert good.time.running > 0 and good.timestamp.result_received >= good.timestamp.compute_started
    assert not bad.success and "InvalidRequest" in bad.failure_info.exception
    assert thinker.submit_returned_before_answer
    assert thinker.tpm._http.is_closed, "the client is closed when the thinker ends"


def test_submit_tpm_refuses_unknown_calls_and_topics(pool: Any) -> None:
    thinker = TPMThinker(SafePipeQueues(topics=["tpm"]), url=pool.url, token=pool.token)
    with pytest.raises(ValueError, match="unknown pool call"):
        thinker.submit_tpm("delete_everything")
    with pytest.raises(ValueError, match="unknown topic"):
        thinker.submit_tpm("generate", "x", topic="nowhere")
    thinker.tpm.close()


def test_thinker_and_methods_need_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TPMFLOW_URL", raising=False)
    monkeypatch.delenv("TPMFLOW_TOKEN", raising=False)
    with pytest.raises(ValueError, match="TPMFLOW_URL"):
        TPMThinker(SafePipeQueues(topics=["tpm"]))
    with pytest.raises(ValueError, match="TPMFLOW_URL"):
        tpm_methods()
    with pytest.raises(ValueError, match="unknown pool call"):
        tpm_methods("http://127.0.0.1:1", "tok", calls=("embed", "rm"))
    names = [m.name for m, _ in tpm_methods("http://127.0.0.1:1", "tok")]
    assert names == ["tpm_generate", "tpm_embed", "tpm_predict", "tpm_probe"]


def test_colmena_proxies_become_plain_values_before_the_pool(tmp_path: Path) -> None:
    from proxystore.connectors.file import FileConnector
    from proxystore.store import Store

    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    with Store("colmena-test", FileConnector(str(tmp_path))) as store:
        proxy = store.proxy(array)
        resolved = plain({"items": [proxy, b"raw"], "n": 2})
    assert type(resolved["items"][0]) is np.ndarray and np.array_equal(resolved["items"][0], array)
    assert resolved["items"][1] == b"raw" and resolved["n"] == 2


def test_one_site_file_splits_into_the_pool_and_the_task_server_configs() -> None:
    for site in ("polaris", "aurora", "slurm"):
        pool_config, task_config = split_site(REPO / "configs" / f"{site}.yaml")
        assert [e.label for e in pool_config.executors] == ["tpm"]
        assert [e.label for e in task_config.executors] == ["sim"]


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_tpm_agent_does_not_block_the_simulation_agent(demo_model_dir: Path) -> None:
    proc = _run(["examples/colmena_thinker.py"], timeout=400)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    # The model is kept busy until the simulations end, so all but a simulation finishing in the
    # instant between two batches overlap it; an agent that waited for the other would see none.
    assert summary["batches"] >= 1 and summary["during_generation"] >= 6, proc.stdout


@pytest.fixture(scope="module")
def campaign(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A short real campaign: 5 arms x 1 seed x 10 simulations, 2 replicas, one killed mid-way."""
    out = tmp_path_factory.mktemp("campaign")
    args = ["-m", "apps.molecular_design.campaign", "--out", str(out), "--seeds", "0", "--budget", "10"]
    args += ["--retrain-every", "4", "--library-size", "300", "--replicas", "2", "--kill-replica-after", "6"]
    proc = _run(args, timeout=600)
    with (out / "simulations.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return {"out": out, "rows": rows, "record": json.loads((out / "run.json").read_text()), "stdout": proc.stdout}


def test_short_campaign_writes_every_simulation_a_plot_and_a_record(campaign: dict[str, Any]) -> None:
    rows, record = campaign["rows"], campaign["record"]
    arms = ["tpm+proposals", "tpm", "fingerprint", "random", "tpm+knowledge"]
    assert sorted({r["arm"] for r in rows}) == sorted(arms)
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        assert len(mine) == 10 and sorted(int(r["index"]) for r in mine) == list(range(10))
        assert all(r["error"] or np.isfinite(float(r["objective"])) for r in mine), "a failure says why"
    cold = arms[:4]
    first = {arm: {r["smiles"] for r in rows if r["arm"] == arm and int(r["index"]) < 4} for arm in cold}
    assert len({frozenset(s) for s in first.values()}) == 1, "every cold arm starts from the same random molecules"
    png = (campaign["out"] / "best_found.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert record["model"]["content_hash"].startswith("blake3:") and record["adapter"]["version"]
    assert record["seeds"] == [0] and record["settings"]["budget"] == 10
    assert set(record["results"]) == set(arms)
    usage = record["ledger_usage"]
    assert usage and sum(int(u.get("requests", 0)) for u in usage) > 0
    assert "winner over 1 seeds" in campaign["stdout"]


def test_the_campaign_remembers_and_a_second_campaign_starts_warm(campaign: dict[str, Any]) -> None:
    """Every simulation is recorded in the campaign's knowledge collection as it arrives; the
    "tpm+knowledge" arm retrieves the "tpm" arm's results before simulating anything, never
    simulates those again, and conditions its proposals on retrieved molecules."""
    import sqlalchemy as sa

    rows, record = campaign["rows"], campaign["record"]
    warm = record["results"]["tpm+knowledge"]
    assert warm["memory_retrieved"][0] > 0 and warm["memory_best"][0] is not None
    remembered = {r["smiles"] for r in rows if r["arm"] == "tpm"}
    assert not remembered & {r["smiles"] for r in rows if r["arm"] == "tpm+knowledge"}, "known results not redone"
    engine = sa.create_engine(f"sqlite:///{campaign['out'] / 'ledger.db'}")
    with engine.connect() as conn:
        items = conn.execute(
            sa.text(
                "SELECT i.item, i.meta FROM knowledge_items i JOIN knowledge_collections c ON c.id = i.collection_id "
                "WHERE c.name = :name"
            ),
            {"name": record["memory_collection"]},
        ).all()
        retrievals = conn.execute(
            sa.text("SELECT count(*) FROM request_ledger WHERE endpoint = 'knowledge/retrieve' AND status = 200")
        ).scalar()
    assert len(items) == len(rows), "every simulation, failures too, is in the collection"
    by_arm = {}
    for item, meta in items:
        by_arm.setdefault(json.loads(meta)["arm"], set()).add(json.loads(item))
    assert by_arm["tpm"] == remembered
    assert retrievals and retrievals >= 1, "the warm arm's proposals retrieved remembered molecules"


def test_campaign_survives_a_replica_killed_mid_way(campaign: dict[str, Any]) -> None:
    import sqlalchemy as sa

    record = campaign["record"]
    assert len(record["replicas_killed"]) == 1, "a replica was killed while it served a TPM call"
    assert all(r["tpm_failures"] == 0 for r in record["results"].values()), "every TPM call was answered"
    assert len(campaign["rows"]) == 50, "every simulation is in the CSV"
    engine = sa.create_engine(f"sqlite:///{campaign['out'] / 'ledger.db'}")
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT request_id, status, retry_of FROM request_ledger")).mappings().all()
    cut = [r for r in rows if r["status"] >= 500]
    assert cut, "the kill cut a call short"
    for row in cut:  # a call cut off by the kill was retried on the other replica and answered
        assert any(r["retry_of"] == row["request_id"] and r["status"] == 200 for r in rows), row
    assert any(r["status"] == 200 for r in rows)


def test_no_thread_left_behind() -> None:
    assert all(not t.name.startswith("tpm-call") for t in threading.enumerate())


def test_safe_pipe_queues_keep_messages_whole_when_threads_send_at_once() -> None:
    """A ParslTaskServer sends each result from the thread that finished the task; on a thread
    executor several send at once. Every message must arrive intact."""
    from concurrent.futures import ThreadPoolExecutor

    queues = SafePipeQueues(topics=["tpm"])
    payloads = {f"{t}-{i}": (f"{t}-{i}:" + "x" * 200_000) for t in range(8) for i in range(10)}
    received: list[str] = []

    def read() -> None:
        for _ in payloads:
            received.append(queues._get_result("tpm", timeout=30))

    reader = threading.Thread(target=read)
    reader.start()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda m: queues._send_result(m, "tpm"), payloads.values()))
    reader.join(timeout=60)
    assert sorted(received) == sorted(payloads.values())
