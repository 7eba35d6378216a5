"""A pool across hosts (issue 16), for real: four hosts on this machine (network namespaces, see
``simulated_hosts``). The gateway and Redis run on host ``gw``; one replica is split over hosts
``n1`` and ``n2`` by pipeline parallelism (PP=2, vLLM's multi-node executor: the head and stage 0
on n1, stage 1 headless on n2, gloo between them over TCP); the test process is the thinker, on a
fourth address. Payloads travel through ProxyStore's Redis connector across hosts: activations
that stage 1 (on n2) captures reach the thinker by reference. Every server binds its host's own
address. Losing host n2 takes the whole replica down and the launcher brings it back; stopping
the pool leaves no process on any host.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml
from simulated_hosts import SimulatedHosts, why_not_available

from tpmflow.errors import TpmflowError
from tpmflow.schema import Capture

pytestmark = pytest.mark.engine
PROMPT = "CC(=O)OC1=CC=CC=C1C(=O)O"
GATEWAY_PORT = 8321


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-12))


class _Serve:
    """``tpmflow serve`` on host gw, its output collected from a thread."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.log.open("a") as out:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                out.write(line)
                out.flush()

    def value(self, key: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.lines:
                if line.startswith(key + "="):
                    return line.split("=", 1)[1]
            assert self.proc.poll() is None, "\n".join(self.lines[-60:])
            time.sleep(0.5)
        raise AssertionError(f"no {key} in {timeout_s:.0f} s:\n" + "\n".join(self.lines[-60:]))


@pytest.fixture(scope="module")
def hosts() -> Iterator[SimulatedHosts]:
    reason = why_not_available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip("LOUD SKIP: " + reason)
    with SimulatedHosts(["gw", "n1", "n2"]) as made:
        yield made


def _start_redis(hosts: SimulatedHosts) -> subprocess.Popen[bytes]:
    """Redis on host gw, on its address only (protected mode off: nothing outside these hosts reaches it)."""
    gw = hosts.address("gw")
    cmd = ["redis-server", "--bind", gw, "--port", "6379", "--save", "", "--appendonly", "no", "--protected-mode", "no"]
    proc = subprocess.Popen([*hosts.exec_prefix("gw"), *cmd], stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 20
    while f"{gw}:6379" not in subprocess.run(
        ["ip", "netns", "exec", hosts.namespace("gw"), "ss", "-Htln"], capture_output=True, text=True
    ).stdout:
        assert time.monotonic() < deadline and proc.poll() is None, "redis did not start"
        time.sleep(0.1)
    return proc


@pytest.fixture(scope="module")
def cluster(hosts: SimulatedHosts, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("multihost")
    gw = hosts.address("gw")
    redis = _start_redis(hosts)
    restarted: list[subprocess.Popen[bytes]] = []  # Redis started again by a test
    config = root / "pool.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model_dir),
                "served_model_name": "tiny",
                "engine": {"pipeline_parallel_size": 2, "nodes": 2, "max_model_len": 256},
                "gateway": {"host": gw, "port": GATEWAY_PORT, "request_timeout_s": 120, "heartbeat_timeout_s": 15},
                "launcher": {
                    "start_timeout_s": 600,
                    "hosts": [
                        {"address": hosts.address(n), "exec": hosts.exec_prefix(n), "interface": hosts.interface(n),
                         "cores": str(i)}
                        for i, n in enumerate(["n1", "n2"])
                    ],  # fmt: skip
                },
                "store": {"connector": "redis", "redis_host": gw, "inline_limit_bytes": 1024},
                "database_url": f"sqlite:///{root / 'access.db'}",
                "max_activation_bytes": 1 << 22,
            }
        )
    )
    serve = _Serve([*hosts.exec_prefix("gw"), sys.executable, "-m", "tpmflow", "serve", "--config", str(config)],
                   root / "serve.log")  # fmt: skip
    try:
        url = serve.value("TPMFLOW_URL", 600)
        token = serve.value("TPMFLOW_TOKEN", 30)
        yield {"url": url, "token": token, "serve": serve, "hosts": hosts, "root": root, "redis": redis,
               "restarted_redis": restarted}  # fmt: skip
    finally:
        if serve.proc.poll() is None:
            os.killpg(serve.proc.pid, signal.SIGTERM)
            try:
                serve.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(serve.proc.pid, signal.SIGKILL)
        for proc in [redis, *restarted]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def hf(tiny_model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(tiny_model_dir)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _greedy(hf: tuple[Any, Any], n: int) -> str:
    model, tok = hf
    ids = tok(PROMPT)["input_ids"]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return str(tok.decode(seq[len(ids) :], skip_special_tokens=True))


def test_a_replica_split_over_two_hosts_serves_the_thinker_through_the_gateway(cluster: dict, hf: Any) -> None:
    from tpmflow import Client

    hosts: SimulatedHosts = cluster["hosts"]
    assert cluster["url"] == f"http://{hosts.address('gw')}:{GATEWAY_PORT}"
    with Client(cluster["url"], cluster["token"]) as client:  # the thinker: the root namespace's address
        (replica,) = client.health()["replicas"]
        assert replica["pipeline_parallel"] == 2, replica
        assert f"{hosts.address('n1')}:8400" in _listening(hosts, "n1"), "the head's API server, on n1's address"
        gen = client.generate(PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True)
        assert gen.text == _greedy(hf, 8), "stage 0 on n1, stage 1 on n2: the unsplit model's tokens"

        # Activations of both stages: stage 1's are written by the worker on n2 into Redis on gw,
        # and the thinker reads them by reference.
        model, tok = hf
        ids = tok(PROMPT)["input_ids"]
        layer_out: dict[int, np.ndarray] = {}  # each decoder layer's output (HF's last hidden state is normed)
        hooks = [
            model.model.layers[i].register_forward_hook(
                lambda m, a, o, i=i: layer_out.__setitem__(i, (o[0] if isinstance(o, tuple) else o)[0].numpy().copy())
            )
            for i in (0, 1)
        ]
        try:
            with torch.no_grad():
                model(torch.tensor([ids]))
        finally:
            for hook in hooks:
                hook.remove()
        trace = client.probe(
            PROMPT, capture=[Capture(site="blocks.0.hook_resid_post"), Capture(site="blocks.1.hook_resid_post")]
        )
    for layer in (0, 1):
        site = f"blocks.{layer}.hook_resid_post"
        assert trace.captures[site].reference is not None, "over the 1 KB inline limit: by reference, via Redis"
        assert _rel(trace[site], layer_out[layer]) < 1e-4, site


def test_a_redis_that_refuses_is_a_clear_error_and_the_replica_stays_up(cluster: dict) -> None:
    from tpmflow import Client
    from tpmflow.errors import StoreUnavailable

    hosts: SimulatedHosts = cluster["hosts"]
    os.killpg(cluster["redis"].pid, signal.SIGKILL)
    cluster["redis"].wait(timeout=10)
    capture = [Capture(site="blocks.1.hook_resid_post")]
    with Client(cluster["url"], cluster["token"], retries=0) as client:
        with pytest.raises(StoreUnavailable, match="payload store refused"):
            client.probe(PROMPT, capture=capture)
        assert client.generate(PROMPT, max_tokens=2).usage["completion_tokens"] == 2, "the engine stayed up"
        cluster["restarted_redis"].append(_start_redis(hosts))
        assert client.probe(PROMPT, capture=capture)["blocks.1.hook_resid_post"].shape[0] > 1


def _listening(hosts: SimulatedHosts, name: str) -> str:
    """``ss``'s listening TCP sockets on host ``name``."""
    cmd = ["ip", "netns", "exec", hosts.namespace(name), "ss", "-Htln"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def test_servers_listen_only_on_their_own_hosts(cluster: dict) -> None:
    """Every listening socket of every host is on that host's own address or its loopback, with one
    exception: torch's TCPStore, the ranks' rendezvous on the head (master_port), binds every
    interface of its host."""
    hosts: SimulatedHosts = cluster["hosts"]
    for name in ("gw", "n1", "n2"):
        listening = _listening(hosts, name).splitlines()
        assert listening, f"nothing listens on {name}?"
        for line in listening:
            address, port = line.split()[3].rsplit(":", 1)
            if address in (hosts.address(name), "127.0.0.1", "[::1]", "127.0.0.53%lo"):
                continue
            assert (name, port) == ("n1", "29501"), f"{name} listens beyond its own address: {line}"
    with pytest.raises(httpx.HTTPError):  # the gateway's port is not open on a replica host
        httpx.get(f"http://{hosts.address('n1')}:{GATEWAY_PORT}/health", timeout=2)


def test_a_lost_host_restarts_the_whole_replica_and_stopping_leaves_nothing(cluster: dict) -> None:
    from tpmflow import Client

    hosts: SimulatedHosts = cluster["hosts"]
    with Client(cluster["url"], cluster["token"]) as client:
        before = client.health()["replicas"][0]["id"]
        head = set(hosts.pids("n1"))
        assert head, "the head's processes run on n1"
        for pid in hosts.pids("n2"):  # host n2 is lost: every process on it dies at once
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while head & set(hosts.pids("n1")):  # the launcher stops the head too: a replica is one unit
            assert time.monotonic() < deadline, "the head outlived the loss of its other node"
            time.sleep(0.5)
        deadline = time.monotonic() + 600
        while True:
            assert time.monotonic() < deadline, "\n".join(cluster["serve"].lines[-40:])
            with contextlib.suppress(TpmflowError):  # 503 while no replica is live
                if client.health()["replicas"]:
                    break
            time.sleep(2)
        assert client.health()["replicas"][0]["id"] == before
        assert client.generate(PROMPT, max_tokens=4, temperature=0.0).usage["completion_tokens"] == 4
    serve: _Serve = cluster["serve"]
    os.killpg(serve.proc.pid, signal.SIGTERM)
    serve.proc.wait(timeout=90)
    deadline = time.monotonic() + 30
    while hosts.pids("n1") or hosts.pids("n2"):
        assert time.monotonic() < deadline, f"left behind: n1 {hosts.pids('n1')}, n2 {hosts.pids('n2')}"
        time.sleep(0.5)
