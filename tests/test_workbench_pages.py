"""The workbench's Models and Campaigns pages over real HTTP (a gateway on 127.0.0.1 with fake
replicas, as in test_gateway_fast.py): what they list, their errors, their escaping and access.
Fast: no vLLM engine, a tiny model store and a hand-written campaign folder."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import save_file
from test_gateway_fast import Rig, rig

from tpmflow.versioning import ModelStore

HOSTILE = "<script>x</script>"
CSV_HEADER = (
    "arm,seed,index,smiles,source,objective,dipole_debye,heavy_atoms,energy_kcal,error,seconds,task_seconds,worker"
)


def _model(folder: Path, tensors: dict[str, np.ndarray], note: str) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "note": note}))
    return folder


@pytest.fixture()
def store(tmp_path: Path) -> tuple[Path, str, str]:
    """Two versions: v2 changes one tensor of v1, adds one and its config; tagged ``prod``."""
    root = tmp_path / "models"
    models = ModelStore(root, durable=False)
    rng = np.random.default_rng(0)
    base = {"embed": rng.standard_normal((16, 8)).astype(np.float32), "head": np.ones((8, 4), np.float32)}
    v1 = models.commit(_model(tmp_path / "m1", base, "one"), "first", "tests", metrics={"loss": 1.25})
    changed = {**base, "head": base["head"] * 1.5, "extra": np.zeros(4, np.float32)}
    v2 = models.commit(_model(tmp_path / "m2", changed, "two"), "tuned <b>head</b>", "tests", parent=v1, tag="prod")
    return root, v1, v2


def _campaign(folder: Path) -> Path:
    """A run still going: two arms, one failed simulation, a hostile SMILES and a half-written row."""
    folder.mkdir(parents=True)
    rows = [
        "random,0,0,CCO,library,0.5,,,,,1,1,w",
        "random,0,1,CCN,library,0.25,,,,,1,1,w",
        "random,0,2,c1ccccc1O,library,0.9,,,,,1,1,w",
        "tpm,0,0,CCCl,library,0.4,,,,,1,1,w",
        'tpm,0,1,CC(=O)O,proposed,nan,,,,"task failed: <img src=x onerror=alert(1)>",1,1,w',
        f"tpm,0,2,{HOSTILE},proposed,1.5,,,,,1,1,w",
    ]
    text = CSV_HEADER + "\r\n" + "\r\n".join(rows) + "\r\n" + "tpm,0,3,CCCC,library,9.9"  # no newline yet
    (folder / "simulations.csv").write_text(text)
    return folder


@pytest.fixture()
def bench(tmp_path: Path, store: tuple[Path, str, str]) -> Iterator[Rig]:
    campaigns = tmp_path / "campaigns"
    _campaign(campaigns / "run-a")
    (campaigns / "not-a-run").mkdir()
    with rig(tmp_path, n_replicas=1, campaign_dirs=[str(campaigns)]) as r:
        r.gateway.cfg.model_store = str(store[0])
        yield r


@contextmanager
def _signed_in(r: Rig) -> Iterator[httpx.Client]:
    """A browser signed in over HTTP as alice, the way test_gateway_fast.py signs in."""
    with httpx.Client(base_url=r.url) as browser:
        page = browser.get("/ui/signin")
        nonce = re.search(r'name="nonce" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        assert browser.post("/ui/signin", data={"token": r.token, "nonce": nonce}).status_code == 303
        yield browser


def _run_ids(html: str) -> list[str]:
    return re.findall(r'href="/ui/campaigns/([0-9a-f]+)"', html)


def test_signed_out_requests_go_to_sign_in(bench: Rig) -> None:
    with httpx.Client(base_url=bench.url) as anonymous:
        for path in (
            "/ui/models",
            "/ui/campaigns",
            "/ui/campaigns/0123456789abcdef",
            "/ui/campaigns/0123456789abcdef/data",
        ):
            resp = anonymous.get(path)
            assert resp.status_code == 303 and resp.headers["location"] == "/ui/signin", path


def test_models_page_lists_versions_tags_and_what_is_served(bench: Rig, store: tuple[Path, str, str]) -> None:
    _, v1, v2 = store
    bench.replicas[0].content_hash = v1
    deadline = time.monotonic() + 60
    while next(iter(bench.gateway.registry.replicas.values())).info.content_hash != v1:
        assert time.monotonic() < deadline, "the fake replica's heartbeat did not report v1"
        time.sleep(0.05)
    with _signed_in(bench) as browser:
        page = browser.get("/ui/models")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        html = page.text
        assert v1[7:19] in html and v2[7:19] in html
        assert "prod" in html and "loss 1.25" in html and "full" in html
        assert "tuned &lt;b&gt;head&lt;/b&gt;" in html and "<b>head</b>" not in html, "messages are escaped"
        served = re.search(r'<tr class="served">(.*?)</tr>', html, re.S)
        assert served and v1[7:19] in served.group(1) and "replica-0" in served.group(1)
        versions = re.search(r'<table id="versions">(.*?)</table>', html, re.S).group(1)  # type: ignore[union-attr]
        assert versions.count("<tr") == 3 and "diff with parent" in versions

        diff = browser.get("/ui/models", params={"a": v1[7:19], "b": "prod"})
        assert diff.status_code == 200
        assert "1 changed, 1 unchanged, 1 added, 0 removed" in diff.text
        table = re.search(r'<table id="diff-tensors">(.*?)</table>', diff.text, re.S).group(1)  # type: ignore[union-attr]
        assert "<code>head</code></td><td>changed</td>" in table and "<code>extra</code></td><td>added</td>" in table
        assert "<code>embed</code>" not in table, "unchanged tensors are only counted"
        assert "<code>config.json</code>: changed" in diff.text

        missing = browser.get("/ui/models", params={"a": "nosuchtag", "b": "prod"})
        assert missing.status_code == 404 and "no version or tag &#39;nosuchtag&#39;" in missing.text
        assert v2[7:19] in missing.text, "the versions are still listed"
        half = browser.get("/ui/models", params={"a": v1[7:19]})
        assert half.status_code == 400 and "give two versions" in half.text


def test_models_page_without_a_store_is_friendly(bench: Rig, tmp_path: Path) -> None:
    bench.gateway.cfg.model_store = str(tmp_path / "nowhere")
    with _signed_in(bench) as browser:
        page = browser.get("/ui/models", params={"a": "x", "b": "y"})
        assert page.status_code == 200 and 'id="no-store"' in page.text and "tpmflow models commit" in page.text
    assert not (tmp_path / "nowhere").exists(), "looking does not create a store"


def test_campaigns_list_a_live_run_and_its_data(bench: Rig) -> None:
    with _signed_in(bench) as browser:
        listing = browser.get("/ui/campaigns")
        assert listing.status_code == 200
        ids = _run_ids(listing.text)
        assert len(ids) == 1 and "run-a" in listing.text and "not-a-run" not in listing.text
        assert "running" in listing.text

        page = browser.get(f"/ui/campaigns/{ids[0]}")
        assert page.status_code == 200 and f'data-src="/ui/campaigns/{ids[0]}/data"' in page.text
        assert "/ui/static/campaign.js" in page.text and "<script>" not in page.text

        resp = browser.get(f"/ui/campaigns/{ids[0]}/data")
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
        data = resp.json()
        assert data["finished"] is False and data["run"] is None
        assert data["simulations"] == 6, "the half-written last row is skipped"
        assert data["failures"] == 1 and "onerror" in data["errors"][0]["error"]
        assert data["arms"] == ["random", "tpm"] and data["x"] == [1, 2, 3]
        assert data["best_so_far"] == {"random": [0.5, 0.5, 0.9], "tpm": [0.4, 0.4, 1.5]}
        assert data["best_so_far_by_seed"]["tpm"]["0"] == [0.4, 0.4, 1.5]
        top = data["top"]
        assert [m["smiles"] for m in top] == [HOSTILE, "c1ccccc1O", "CCO", "CCCl", "CCN"]
        assert top[0]["image"] is None, "a string RDKit cannot read is shown as text only"
        try:
            import rdkit  # noqa: F401
        except ImportError:
            assert all(m["image"] is None for m in top)
        else:
            assert top[1]["image"].startswith("data:image/svg+xml;base64,")

        for html in (listing.text, page.text):
            assert HOSTILE not in html and "onerror=alert" not in html
        assert browser.get("/ui/campaigns/0123456789abcdef").status_code == 404
        assert browser.get("/ui/campaigns/0123456789abcdef/data").status_code == 404
        assert browser.get("/ui/campaigns/..%2F..%2Fetc").status_code == 404


def test_a_finished_run_shows_its_record(bench: Rig, tmp_path: Path) -> None:
    run = tmp_path / "campaigns" / "run-a"
    record = {
        "seeds": [0],
        "settings": {"budget": 3, "retrain_every": 2},
        "ledger_usage": [
            {"principal": "alice", "requests": 7, "prompt_tokens": 10, "output_tokens": 5, "charge_su": 0.5}
        ],
        "results": {"tpm": {"best_mean": 1.5, "best_std": float("nan")}},
    }
    (run / "run.json").write_text(json.dumps(record))  # NaN, as json.dumps writes it
    with _signed_in(bench) as browser:
        rid = _run_ids(browser.get("/ui/campaigns").text)[0]
        data = browser.get(f"/ui/campaigns/{rid}/data").json()
        assert data["run"]["ledger_usage"] is None, "alice neither ran it nor is an admin: no bill"
        (run / "campaign.json").write_text(json.dumps({"principal": "alice", "started": 0}))
        data = browser.get(f"/ui/campaigns/{rid}/data").json()
    assert data["finished"] is True
    assert data["run"]["ledger_usage"][0]["requests"] == 7 and data["run"]["seeds"] == [0]
    assert data["run"]["results"]["tpm"] == {"best_mean": 1.5, "best_std": None}, "NaN becomes null"


def test_a_running_campaign_shows_its_tpm_calls_only_to_its_principal(bench: Rig, tmp_path: Path) -> None:
    """campaign.json names who runs the campaign: that principal (and admins) see its TPM calls so
    far from the ledger; anyone else sees the run without them; a finished run has its record."""
    folder = tmp_path / "campaigns" / "run-a"
    assert bench.post("/v1/completions", {"prompt": "C", "max_tokens": 2}).status_code == 200
    with _signed_in(bench) as browser:
        (rid,) = _run_ids(browser.get("/ui/campaigns").text)
        assert "live_usage" in browser.get(f"/ui/campaigns/{rid}/data").json()
        assert browser.get(f"/ui/campaigns/{rid}/data").json()["live_usage"] is None, "no campaign.json"
        (folder / "campaign.json").write_text(json.dumps({"principal": "alice", "started": time.time() - 60}))
        (usage,) = browser.get(f"/ui/campaigns/{rid}/data").json()["live_usage"]
        assert usage["principal"] == "alice" and usage["requests"] >= 1 and usage["charge_su"] >= 0
        (folder / "campaign.json").write_text(json.dumps({"principal": "someone-else", "started": 0}))
        assert browser.get(f"/ui/campaigns/{rid}/data").json()["live_usage"] is None, "not alice's campaign"
        (folder / "campaign.json").write_text("{not json")
        assert browser.get(f"/ui/campaigns/{rid}/data").json()["live_usage"] is None


def test_runs_behind_symlinks_and_absurd_rows_are_not_read(bench: Rig, tmp_path: Path) -> None:
    """A symlink from the published folder to a run elsewhere is not listed; a row with an index
    of 10^9 is skipped, not allocated."""
    outside = tmp_path / "elsewhere" / "secret-run"
    _campaign(outside)
    (tmp_path / "campaigns" / "link").symlink_to(outside)
    with (tmp_path / "campaigns" / "run-a" / "simulations.csv").open("a") as f:
        f.write(",,,,,1,1,w\r\nrandom,0,1000000000,CC,library,0.1,,,,,1,1,w\r\n")
    with _signed_in(bench) as browser:
        listing = browser.get("/ui/campaigns").text
        assert len(_run_ids(listing)) == 1 and "secret-run" not in listing, listing[listing.find("secret-run") - 300 :]
        (rid,) = _run_ids(listing)
        data = browser.get(f"/ui/campaigns/{rid}/data").json()
    assert data["simulations"] == 7 and len(data["x"]) < 100
