"""The site templates (configs/polaris.yaml, aurora.yaml, slurm.yaml), each in its small-model
layout (one replica per GPU or tile) and its big-model layout (one replica over 2 nodes), rendered
to what the scheduler, Parsl and vLLM would run: the batch script, the MPI launcher's command, each
node's vLLM command line and environment. No cluster is reachable from here; the rendering uses
Parsl's own providers and MPI prefix composer. The big layouts are also checked by `tpmflow plan`:
the shape each one names must hold its model on its site's accelerators."""

from __future__ import annotations

from pathlib import Path

import pytest

from tpmflow.config import PoolConfig
from tpmflow.parsl import load_site
from tpmflow.parsl.render import RenderedSite, render_site
from tpmflow.planning import PlanRequest, run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NODES = ["10.1.0.1", "10.1.0.2"]
LLAMA_70B = "layers=80,hidden=8192,heads=64,kv_heads=8,vocab=128256,intermediate=28672"
LLAMA_405B = "layers=126,hidden=16384,heads=128,kv_heads=8,vocab=128256,intermediate=53248"
# site -> (hardware of the big layout for the planner, its model, devices per node of the small layout,
# the scheduler's line of a big layout's 2-node block, devices per node of the big layout's nodes)
SITES = {
    "polaris": ("polaris", LLAMA_70B, 4, "#PBS -l select=2:ncpus=64:ngpus=4", 4),
    "aurora": ("aurora", LLAMA_405B, 12, "#PBS -l select=2:ncpus=208", 12),
    "slurm": ("h100-80gb", LLAMA_405B, 4, "#SBATCH --nodes=2", 8),
}


def _render(site: str, layout: str | None, tmp_path: Path) -> RenderedSite:
    return render_site(load_site(CONFIGS / f"{site}.yaml", layout), NODES, str(tmp_path))


@pytest.mark.parametrize("site", list(SITES))
def test_the_small_layout_runs_one_replica_per_device(site: str, tmp_path: Path) -> None:
    rendered = _render(site, None, tmp_path)
    tpm = rendered.executors[0]
    assert tpm.label == "tpm" and tpm.kind == "HighThroughputExecutor"
    assert "process_worker_pool.py" in tpm.job_script and "--enable_mpi_mode" not in tpm.job_script
    per_node = SITES[site][2]
    assert len(rendered.replicas) == per_node
    devices = [r.devices for r in rendered.replicas]
    assert len(set(devices)) == per_node, f"every replica on a device of its own: {devices}"
    for replica in rendered.replicas:
        (node,) = replica.nodes
        cmd = " ".join(node.command)
        assert "--tensor-parallel-size 1 --pipeline-parallel-size 1" in cmd and "--nnodes" not in cmd
        assert node.env["TPMFLOW_GATEWAY_URL"].startswith("http://") and node.env["VLLM_PLUGINS"] == "tpmflow"


@pytest.mark.parametrize("site", list(SITES))
def test_the_big_layout_runs_one_replica_over_two_nodes(site: str, tmp_path: Path) -> None:
    rendered = _render(site, "big", tmp_path)
    cfg = load_site(CONFIGS / f"{site}.yaml", "big").pool
    tpm = rendered.executors[0]
    assert tpm.kind == "MPIExecutor" and "--enable_mpi_mode" in tpm.job_script
    assert SITES[site][3] in tpm.job_script, tpm.job_script
    assert "--max_workers_per_node=1 " in tpm.job_script, "one 2-node replica per 2-node block"
    (replica,) = rendered.replicas
    launch = " ".join(replica.launch or [])
    if site == "slurm":
        assert launch.startswith("srun --kill-on-bad-exit=1 --ntasks 2 --ntasks-per-node 1 --nodelist 10.1.0.1,10.1.0.2")
    else:
        assert launch.startswith("mpiexec -n 2 -ppn 1 -hosts 10.1.0.1,10.1.0.2")
    assert launch.endswith("-m tpmflow.pool.node_agent"), "one node agent per node"
    head, worker = replica.nodes
    assert replica.url == f"http://10.1.0.1:{cfg.launcher.replica_port}"
    assert head.command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert worker.command[1:3] == ["-m", "tpmflow.engine.headless"]
    for rank, node in enumerate(replica.nodes):
        cmd = " ".join(node.command)
        assert f"--nnodes 2 --node-rank {rank} --master-addr 10.1.0.1 --master-port 29501" in cmd
        assert f"--tensor-parallel-size {cfg.engine.tensor_parallel_size} --pipeline-parallel-size 2" in cmd
        assert node.env["VLLM_HOST_IP"] == NODES[rank], "each node announces its own address"
        assert node.env["GLOO_SOCKET_IFNAME"] == cfg.engine.node_interface
        assert all(node.env[k] == v for k, v in cfg.engine.env.items())
    assert "--host" not in worker.command and "--port" not in worker.command, "a headless node serves no API"
    same = [a for a in head.command[3:] if a not in ("--host", "0.0.0.0", "--port", str(cfg.launcher.replica_port))]
    assert same[:-8] == worker.command[3:-8], "every node builds the same engine (all flags but its rank)"
    assert cfg.engine.ranks_per_node <= SITES[site][4], "TP inside a node"


@pytest.mark.parametrize("site", list(SITES))
def test_the_planner_agrees_the_big_layout_holds_its_model(site: str) -> None:
    hardware, arch = SITES[site][:2]
    result = run(PlanRequest(hardware=hardware, arch=arch, config=str(CONFIGS / f"{site}.yaml"), layout="big"))
    assert result.warnings == [], result.warnings
    small = run(PlanRequest(hardware=hardware, arch=arch, config=str(CONFIGS / f"{site}.yaml")))
    assert any("cannot hold" in w for w in small.warnings), "one device per replica cannot hold it"


def test_bad_layouts_and_blocks_are_refused_by_name(tmp_path: Path) -> None:
    from tpmflow.pool.multinode import mpi_launch

    with pytest.raises(ValueError, match="has no layout 'huge' \\(its layouts: big\\)"):
        load_site(CONFIGS / "polaris.yaml", "huge")
    text = (CONFIGS / "polaris.yaml").read_text()
    bad = tmp_path / "no-mpi.yaml"
    bad.write_text(text.replace("          mpi_launcher: mpiexec\n", "", 1))
    with pytest.raises(ValueError, match="need Parsl's MPI mode on executor 'tpm'"):
        load_site(bad, "big")
    with pytest.raises(ValueError, match="cannot be split evenly over 3 nodes"):
        PoolConfig(model="m", engine={"tensor_parallel_size": 4, "pipeline_parallel_size": 2, "nodes": 3})
    cfg = load_site(CONFIGS / "slurm.yaml", "big").pool
    with pytest.raises(ValueError, match="given 1 by the block"):
        mpi_launch(cfg, 0, "replica-0", ["10.1.0.1"], "srun", 8400, "0.0.0.0", cfg.model)
    with pytest.raises(ValueError, match="node 'no-such-node.invalid' of the block does not resolve"):
        mpi_launch(cfg, 0, "replica-0", ["10.1.0.1", "no-such-node.invalid"], "srun", 8400, "0.0.0.0", cfg.model)


def test_the_local_launcher_needs_hosts_for_a_replica_over_nodes(tmp_path: Path) -> None:
    from tpmflow.pool.launch import LocalLauncher

    cfg = PoolConfig(model="tiny-llama", engine={"pipeline_parallel_size": 2, "nodes": 2})
    with pytest.raises(ValueError, match="needs their hosts: list them in launcher.hosts"):
        LocalLauncher(cfg, "http://127.0.0.1:1", "s", tmp_path)
    cfg = PoolConfig(
        model="tiny-llama", engine={"pipeline_parallel_size": 2, "nodes": 2}, launcher={"hosts": [{"address": "10.1.0.1"}]}
    )
    with pytest.raises(ValueError, match="need 2 entries in launcher.hosts; the config lists 1"):
        LocalLauncher(cfg, "http://127.0.0.1:1", "s", tmp_path)


def test_tpmflow_site_render_prints_the_scripts_and_node_commands() -> None:
    from typer.testing import CliRunner

    from tpmflow.cli import app

    out = CliRunner().invoke(app, ["site", "render", str(CONFIGS / "aurora.yaml"), "--layout", "big", "--nodes",
                                   ",".join(NODES)])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "#PBS -l select=2:ncpus=208" in out.output and "mpiexec -n 2 -ppn 1 -hosts 10.1.0.1,10.1.0.2" in out.output
    assert "node 1 (10.1.0.2) ZE_FLAT_DEVICE_HIERARCHY=FLAT" in out.output
    bad = CliRunner().invoke(app, ["site", "render", str(CONFIGS / "aurora.yaml"), "--layout", "huge"])
    assert bad.exit_code == 2 and "no layout 'huge'" in bad.output


def test_a_replica_app_that_fails_at_once_is_not_resubmitted_forever(tmp_path: Path) -> None:
    """A replica over 2 nodes on an executor without Parsl's MPI mode cannot get its nodes: the
    launcher gives up after three quick failures and says why (Pool.wait_ready raises it)."""
    import time

    import parsl
    from parsl.config import Config
    from parsl.executors import ThreadPoolExecutor

    from tpmflow.pool.parsl_launcher import ParslLauncher

    cfg = PoolConfig(model="tiny-llama", engine={"pipeline_parallel_size": 2, "nodes": 2}, launcher={"kind": "parsl"})
    parsl.load(Config(executors=[ThreadPoolExecutor(label="tpm")], run_dir=str(tmp_path / "runinfo")))
    launcher = ParslLauncher(cfg, "http://127.0.0.1:1", "s", tmp_path / "logs")
    try:
        launcher.start()
        deadline = time.monotonic() + 30
        while not launcher.gave_up:
            assert time.monotonic() < deadline, launcher.restarts
            time.sleep(0.2)
    finally:
        launcher.stop()
        parsl.dfk().cleanup()
    assert "resource specification is not supported" in launcher.gave_up["replica-0"]
    assert launcher.restarts["replica-0"] == 2


def test_a_node_agent_reads_its_rank_from_its_own_launcher() -> None:
    from tpmflow.pool.node_agent import rank_from_env

    # Under Slurm an mpiexec task inherits the batch step's SLURM_PROCID=0: only srun's is read.
    env = {"SLURM_PROCID": "0", "PALS_RANKID": "1"}
    assert rank_from_env(env, "mpiexec") == 1
    assert rank_from_env({"SLURM_PROCID": "1"}, "srun") == 1
    with pytest.raises(SystemExit, match="none of SLURM_PROCID is set"):
        rank_from_env({"PMI_RANK": "1"}, "srun")


def test_mpi_mode_for_one_node_replicas_is_refused(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    text = (CONFIGS / "slurm.yaml").read_text().replace("      launcher: srun\n      max_workers_per_node: 4\n",
                                                         "      launcher: simple\n      mpi_launcher: srun\n", 1)
    site.write_text(text)
    with pytest.raises(ValueError, match="runs in Parsl's MPI mode, for replicas over several nodes"):
        load_site(site)
