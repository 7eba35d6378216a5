"""The model store (tpmflow.versioning): bit-identical round trips, delta chains, LoRA factors,
integrity, crash safety, gc and the CLI. Fast: no vLLM engine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from tpmflow.errors import InvalidRequest, StoreCorrupted, VersionNotFound
from tpmflow.models.card import content_hash, read_card
from tpmflow.versioning import ModelStore
from tpmflow.versioning.blobs import BlobStore

CHUNK = 16 << 10  # small chunks so the test models' 64-128 KiB matrices span several


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store", chunk_size=CHUNK, durable=False)


def _weights(folder: Path) -> tuple[bytes, np.ndarray]:
    """The verbatim header and the data section as float32 (both test models are all-F32)."""
    blob = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[: 8 + n], np.frombuffer(blob, np.float32, offset=8 + n).copy()


def _variant(src: Path, dst: Path, change: Callable[[np.ndarray], np.ndarray]) -> Path:
    """A copy of a model folder whose weights are ``change(weights)``, header kept byte for byte."""
    shutil.copytree(src, dst)
    header, data = _weights(src)
    (dst / "model.safetensors").write_bytes(header + change(data).astype(np.float32).tobytes())
    return dst


def _same_folder(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("which", ["tiny_model_dir", "demo_model_dir"])
def test_commit_then_checkout_is_bit_identical(which: str, store: ModelStore, tmp_path: Path, request) -> None:
    src: Path = request.getfixturevalue(which)
    version = store.commit(src, "as built", "tests")
    assert version == content_hash(src) == read_card(src).content_hash  # the version id is the card's hash
    out = store.checkout(version, tmp_path / "out")
    _same_folder(src, out)
    assert content_hash(out) == version
    original, restored = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert original.keys() == restored.keys()
    assert all(np.array_equal(original[k], restored[k]) for k in original)
    assert store.verify().ok
    # committing the same weights again is a no-op that returns the same version
    assert store.commit(src, "again", "tests") == version and store.versions() == [version]


def test_checkout_loads_with_transformers(tiny_model_dir: Path, store: ModelStore, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    out = store.checkout(store.commit(tiny_model_dir, "m", "t"), tmp_path / "out")
    assert AutoConfig.from_pretrained(out).model_type == "llama"
    assert AutoTokenizer.from_pretrained(out)("CCO")["input_ids"]


def test_ten_version_delta_chain(demo_model_dir: Path, store: ModelStore, tmp_path: Path) -> None:
    """Sparse, small dense and full changes, an unchanged and a reverted version: each version
    checks out bit-identical to the folder it was committed from, and storage grows accordingly."""
    rng = np.random.default_rng(7)

    def sparse(w: np.ndarray) -> np.ndarray:
        w = w.copy()
        idx = rng.choice(w.size, w.size // 100, replace=False)
        w[idx] += rng.standard_normal(idx.size).astype(np.float32) * 0.01
        return w

    def dense_small(w: np.ndarray) -> np.ndarray:
        return w * (1 + 1e-4 * rng.standard_normal(w.size)).astype(np.float32)

    def full(w: np.ndarray) -> np.ndarray:
        return rng.standard_normal(w.size).astype(np.float32) * 0.02

    steps = [sparse, dense_small, sparse, full, sparse, lambda w: w, dense_small, sparse, "revert"]
    folders, versions = [demo_model_dir], [store.commit(demo_model_dir, "v0", "tests")]
    current = _weights(demo_model_dir)[1]
    model_bytes = current.nbytes
    for i, step in enumerate(steps, start=1):
        before = store.disk_usage()
        if step == "revert":
            folder = folders[2]
        else:
            current = step(current)
            folder = _variant(demo_model_dir, tmp_path / f"v{i}", lambda _, c=current: c)
        versions.append(store.commit(folder, f"v{i}", "tests", parent=versions[-1]))
        folders.append(folder)
        added = store.disk_usage() - before
        encodings = {r.encoding for r in store.show(versions[-1]).tensors.values()}
        if step is sparse:
            assert "sparse" in encodings and added < 0.05 * model_bytes
        elif step is dense_small:
            assert "xor" in encodings and added < 0.7 * model_bytes
        elif step is full:
            assert added > 0.5 * model_bytes
        else:  # unchanged or reverted: the same version, nothing new stored
            assert versions[-1] == versions[-2 if step != "revert" else 2] and added == 0
    assert max(r.depth for r in store.show(versions[8]).tensors.values()) >= 2  # deltas on deltas
    for i, (version, folder) in enumerate(zip(versions, folders, strict=True)):
        out = store.checkout(version, tmp_path / f"out{i}")
        assert (out / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert store.verify().ok
    d = store.diff(versions[0], versions[1])
    changed = {t.name: t for t in d.changed}
    assert changed and all(0.001 < t.fraction_changed < 0.05 for t in changed.values() if t.elements > 1000)
    assert all(t.relative_l2 is not None and 0 < t.relative_l2 < 0.5 for t in changed.values())
    assert store.diff(versions[0], versions[0]).changed == []
    assert [m.id for m in store.log(versions[8])][-1] == versions[0]


def test_long_chains_get_a_keyframe(tiny_model_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", durable=False, max_depth=2)
    version, current = store.commit(tiny_model_dir, "v0", "t"), _weights(tiny_model_dir)[1]
    for i in range(4):
        current = current.copy()
        current[:: 997 + i] += 1.0
        folder = _variant(tiny_model_dir, tmp_path / f"v{i}", lambda _, c=current: c)
        version = store.commit(folder, f"v{i}", "t", parent=version)
        assert max(r.depth for r in store.show(version).tensors.values()) <= 2
    assert store.checkout(version, tmp_path / "out") and store.verify().ok


def _peft_folder(path: Path, base: dict[str, np.ndarray], rank: int, alpha: float, rng, dtype=np.float32) -> Path:
    """A PEFT-style LoRA folder: q/v/down projections of every layer and the embedding."""
    path.mkdir()
    tensors = {}
    for name, w in base.items():
        module = name.removesuffix(".weight")
        if name.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")):
            tensors[f"base_model.model.{module}.lora_A.weight"] = rng.standard_normal((rank, w.shape[1])).astype(dtype)
            tensors[f"base_model.model.{module}.lora_B.weight"] = rng.standard_normal((w.shape[0], rank)).astype(dtype)
        elif name == "model.embed_tokens.weight":
            tensors[f"base_model.model.{module}.lora_embedding_A"] = rng.standard_normal((rank, w.shape[0])).astype(
                dtype
            )
            tensors[f"base_model.model.{module}.lora_embedding_B"] = rng.standard_normal((w.shape[1], rank)).astype(
                dtype
            )
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_lora_commit_matches_the_float64_reference(tiny_model_dir: Path, store: ModelStore, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    lora = _peft_folder(tmp_path / "lora", base, rank=4, alpha=8.0, rng=rng)
    parent = store.commit(tiny_model_dir, "base", "t")
    before = store.disk_usage()
    version = store.commit(None, "lora", "t", parent=parent, lora=lora)
    assert store.disk_usage() - before < 0.3 * sum(w.nbytes for w in base.values())  # factors, not dense weights
    out = load_file(str(store.checkout(version, tmp_path / "out") / "model.safetensors"))
    factors = load_file(str(lora / "adapter_model.safetensors"))
    for name, w in base.items():
        module = "base_model.model." + name.removesuffix(".weight")
        if f"{module}.lora_A.weight" in factors:
            a, b = factors[f"{module}.lora_A.weight"], factors[f"{module}.lora_B.weight"]
            expected = (w.astype(np.float64) + 2.0 * (b.astype(np.float64) @ a.astype(np.float64))).astype(np.float32)
        elif f"{module}.lora_embedding_A" in factors:
            a, b = factors[f"{module}.lora_embedding_A"], factors[f"{module}.lora_embedding_B"]
            expected = (w.astype(np.float64) + 2.0 * (b.astype(np.float64) @ a.astype(np.float64)).T).astype(np.float32)
        else:
            expected = w
        assert np.array_equal(out[name], expected), name
    manifest = store.show(version)
    assert manifest.lora and {r.encoding for r in manifest.tensors.values()} == {"chunks", "lora"}
    assert json.loads((tmp_path / "out" / "tpmflow-card.json").read_text())["content_hash"] == version
    # deterministic: a fresh store, and the "base folder + --lora" form, give the same version id
    other = ModelStore(tmp_path / "other", durable=False)
    other.commit(tiny_model_dir, "base", "t")
    assert other.commit(tiny_model_dir, "lora again", "t", lora=lora) == version
    assert store.verify().ok
    # a second LoRA on top of the first chains its factors (bf16 factors this time)
    lora2 = _peft_folder(tmp_path / "lora2", base, rank=2, alpha=2.0, rng=rng, dtype=np.float16)
    version2 = store.commit(None, "lora 2", "t", parent=version, lora=lora2)
    assert max(r.depth for r in store.show(version2).tensors.values()) == 2
    assert content_hash(store.checkout(version2, tmp_path / "out2")) == version2


def test_lora_bad_inputs(tiny_model_dir: Path, store: ModelStore, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    lora = _peft_folder(tmp_path / "lora", base, rank=2, alpha=2.0, rng=rng)
    with pytest.raises(VersionNotFound, match="commit it first"):
        store.commit(tiny_model_dir, "m", "t", lora=lora)
    with pytest.raises(InvalidRequest, match="parent"):
        store.commit(None, "m", "t", lora=lora)
    with pytest.raises(InvalidRequest, match="not a PEFT LoRA folder"):
        store.commit(None, "m", "t", parent="x", lora=tmp_path)


def test_lora_versions_export_as_the_adapter_vllm_serves(
    tiny_model_dir: Path, store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exported PEFT folder holds the committed factors: committing it again on the same parent
    gives the same version id. What vLLM cannot apply as one adapter is refused with the reason."""
    from tpmflow.config import PoolConfig
    from tpmflow.pool.replica import replica_command
    from tpmflow.versioning import materialise_lora
    from tpmflow.versioning.checkout import check_loras
    from tpmflow.versioning.lora import StoredFactors, write_peft

    monkeypatch.setenv("TPMFLOW_HOME", str(tmp_path / "home"))
    rng = np.random.default_rng(5)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    no_embedding = {k: v for k, v in base.items() if k != "model.embed_tokens.weight"}
    parent = store.commit(tiny_model_dir, "base", "t", tag="base")
    version = store.commit(
        None, "lora", "t", parent=parent, lora=_peft_folder(tmp_path / "l", no_embedding, 4, 8.0, rng), tag="l"
    )
    served = materialise_lora("l", store.root)
    assert (served.version, served.parent) == (version, parent)
    assert read_card(served.base_dir).content_hash == parent
    assert store.commit(None, "again", "t", parent=parent, lora=served.adapter_dir) == version
    assert materialise_lora(version, store.root) == served, "exported once, then reused"
    # the pool starts the parent's replica with vLLM's LoRA flags naming the version
    cfg = PoolConfig(model="m", version="base", lora_versions=["l"], model_store=str(store.root))
    cmd = replica_command(cfg, 8000)
    assert cmd[cmd.index("--max-lora-rank") + 1] == "8" and "--enable-lora" in cmd
    assert cmd[cmd.index("--lora-modules") + 1] == f"{version}={served.adapter_dir}"
    assert replica_command(cfg.model_copy(update={"lora_versions": None}), 8000).count("--enable-lora") == 0
    # refusals: a LoRA whose parent no replica runs; a dense version; an embedding (transposed) update
    with pytest.raises(InvalidRequest, match="which no replica runs"):
        check_loras(cfg.model_copy(update={"version": "l"}))
    with pytest.raises(InvalidRequest, match="not committed as LoRA factors"):
        materialise_lora("base", store.root)
    with_embedding = store.commit(None, "e", "t", parent=parent, lora=_peft_folder(tmp_path / "e", base, 4, 8.0, rng))
    with pytest.raises(InvalidRequest, match="cannot be served as a LoRA adapter: model.embed_tokens.weight"):
        materialise_lora(with_embedding, store.root)
    factors = store.lora_factors(version)[1]
    mixed = [factors[0], StoredFactors(factors[1].module, factors[1].a, factors[1].b, scale=1.0)]
    with pytest.raises(InvalidRequest, match="differ in rank"):
        write_peft(mixed, tmp_path / "mixed", parent)


def test_corrupted_blob_is_detected(tiny_model_dir: Path, store: ModelStore, tmp_path: Path) -> None:
    version = store.commit(tiny_model_dir, "m", "t")
    record = store.show(version).tensors["model.layers.0.mlp.up_proj.weight"]
    path = store.blobs.path(record.blobs[1])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    report = store.verify()
    assert not report.ok and any(record.blobs[1] in p for p in report.problems)
    with pytest.raises(StoreCorrupted):
        store.checkout(version, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written is left behind
    path.unlink()
    assert not store.verify(deep=False).ok
    with pytest.raises(StoreCorrupted, match="missing"):
        store.checkout(version, tmp_path / "out")


def test_commit_interrupted_in_the_write_path(
    tiny_model_dir: Path, store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v0 = store.commit(tiny_model_dir, "v0", "t")
    folder = _variant(tiny_model_dir, tmp_path / "v1", lambda w: w * 1.5)
    real_write, calls = BlobStore.write, []

    def failing_write(self, blob):  # type: ignore[no-untyped-def]
        calls.append(blob.id)
        if len(calls) == 5:
            raise OSError("disk full")
        return real_write(self, blob)

    monkeypatch.setattr(BlobStore, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        store.commit(folder, "v1", "t", parent=v0)
    monkeypatch.setattr(BlobStore, "write", real_write)
    import tpmflow.versioning.store as store_module

    def failing_manifest(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("killed before the manifest")

    monkeypatch.setattr(store_module, "write_atomic", failing_manifest)
    with pytest.raises(OSError, match="manifest"):
        store.commit(folder, "v1", "t", parent=v0, tag="v1")
    monkeypatch.undo()
    fresh = ModelStore(store.root, durable=False)
    report = fresh.verify()
    assert report.ok and report.unreferenced_blobs > 0 and fresh.versions() == [v0] and fresh.tags.all() == {}
    _same_folder(tiny_model_dir, fresh.checkout(v0, tmp_path / "out"))
    assert fresh.gc().removed_blobs == report.unreferenced_blobs
    v1 = fresh.commit(folder, "v1", "t", parent=v0)
    assert content_hash(fresh.checkout(v1, tmp_path / "out1")) == v1 and fresh.verify().unreferenced_blobs == 0


KILLER = """
import os, signal, stat, sys
from pathlib import Path
import tpmflow.versioning.atomic as atomic
from tpmflow.versioning import ModelStore

count, real = [0], os.fsync
def fsync(fd):
    if stat.S_ISDIR(os.fstat(fd).st_mode):  # a directory's, after a rename: not a kill point here
        return real(fd)
    count[0] += 1
    if count[0] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # die with a temp file written but not renamed
    real(fd)
atomic.os.fsync = fsync
store = ModelStore(sys.argv[1], chunk_size=16384)
store.commit(Path(sys.argv[2]), "killed", "t", parent=sys.argv[4], tag="killed")
print(count[0])
"""


def test_commit_killed_with_sigkill_leaves_a_valid_store(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A commit process killed at its first blob, mid-blobs, writing the manifest, writing the tag."""
    store = ModelStore(tmp_path / "store", chunk_size=CHUNK)
    v0 = store.commit(tiny_model_dir, "v0", "t")
    folder = _variant(tiny_model_dir, tmp_path / "v1", lambda w: w * 1.5)
    v1 = content_hash(folder)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)

    def commit_in_child(root: Path, kill_at: int) -> subprocess.CompletedProcess[str]:
        args = [sys.executable, str(script), str(root), str(folder), str(kill_at), v0]
        return subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)

    shutil.copytree(store.root, tmp_path / "probe")
    done = commit_in_child(tmp_path / "probe", 0)  # count the fsyncs of a whole commit
    assert done.returncode == 0, done.stderr
    fsyncs = int(done.stdout)
    for kill_at in (1, fsyncs // 2, fsyncs - 1, fsyncs):
        proc = commit_in_child(store.root, kill_at)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        store = ModelStore(store.root)
        report = store.verify()
        assert report.ok, report.problems
        assert any((store.root / "tmp").iterdir())  # the write it died in never got a name
        assert store.versions() == sorted([v0, v1] if kill_at == fsyncs else [v0])
        assert store.tags.all() == {}  # the tag is the last write, so it never dangles
        _same_folder(tiny_model_dir, store.checkout(v0, tmp_path / f"out{kill_at}"))
        store.gc()  # back to the starting state, so the next run's fsyncs line up
    assert content_hash(store.checkout(v1, tmp_path / "out")) == v1
    assert store.verify().unreferenced_blobs == 0 and not any((store.root / "tmp").iterdir())


def test_gc_removes_only_unreachable_blobs(tiny_model_dir: Path, store: ModelStore, tmp_path: Path) -> None:
    v0 = store.commit(tiny_model_dir, "v0", "t")
    v1 = store.commit(_variant(tiny_model_dir, tmp_path / "v1", lambda w: w + 0.5), "v1", "t", parent=v0)
    reachable = set(store.blobs.ids())
    orphans = {store.blobs.put(np.frombuffer(os.urandom(4096), np.uint8)) for _ in range(3)}
    (store.tmp_dir / "stale.partial").write_bytes(b"x")
    report = store.gc()
    assert report.removed_blobs == 3 and report.kept_blobs == len(reachable)
    assert set(store.blobs.ids()) == reachable and not orphans & reachable
    assert not any(store.tmp_dir.iterdir())
    assert store.verify().ok and store.gc().removed_blobs == 0
    assert content_hash(store.checkout(v1, tmp_path / "out")) == v1


def test_tags_and_names(tiny_model_dir: Path, store: ModelStore, tmp_path: Path) -> None:
    v0 = store.commit(tiny_model_dir, "v0", "t", tag="base")
    v1 = store.commit(_variant(tiny_model_dir, tmp_path / "v1", lambda w: -w), "v1", "t", parent="base")
    assert store.resolve("base") == v0 and store.resolve(v1[7:17]) == v1 and store.resolve(v1[:20]) == v1
    assert store.show(v1).parent == v0
    with pytest.raises(InvalidRequest, match="force"):
        store.tag("base", v1)
    assert store.tag("base", v1, force=True) == v1
    with pytest.raises(VersionNotFound):
        store.tag("prod", "blake3:" + "0" * 64)
    with pytest.raises(InvalidRequest, match="bad tag name"):
        store.tag("../escape", v0)
    with pytest.raises(VersionNotFound):
        store.checkout("nope", tmp_path / "x")
    with pytest.raises(InvalidRequest, match="not an empty folder"):
        store.checkout(v0, tiny_model_dir)


def test_bad_input_is_refused(tiny_model_dir: Path, store: ModelStore, tmp_path: Path) -> None:
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(InvalidRequest, match="no \\*.safetensors"):
        store.commit(empty, "m", "t")
    with pytest.raises(InvalidRequest, match="not a folder"):
        store.commit(tmp_path / "missing", "m", "t")
    broken = _variant(tiny_model_dir, tmp_path / "broken", lambda w: w)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:-4])
    with pytest.raises(InvalidRequest, match="safetensors"):
        store.commit(broken, "m", "t")
    store.commit(tiny_model_dir, "m", "t")
    other_config = _variant(tiny_model_dir, tmp_path / "cfg", lambda w: w)
    (other_config / "config.json").write_text("{}")
    with pytest.raises(InvalidRequest, match="already stored"):
        store.commit(other_config, "m", "t")
    with pytest.raises(VersionNotFound):
        store.commit(tiny_model_dir, "m", "t", parent="nope")


def test_cli(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    import tpmflow.cli
    from tpmflow.cli import app

    monkeypatch.setattr(tpmflow.cli, "console", Console(width=240))  # no wrapped table cells
    runner = CliRunner()
    root = str(tmp_path / "store")

    def cli(*args: str) -> str:
        result = runner.invoke(app, ["models", *args, "--store", root])
        assert result.exit_code == 0, (result.output, result.exception)
        return result.output

    v0 = read_card(tiny_model_dir).content_hash
    assert v0 in cli("commit", str(tiny_model_dir), "-m", "base", "--author", "ada", "--tag", "base")
    v1_dir = _variant(tiny_model_dir, tmp_path / "v1", lambda w: w + 1e-3)
    cli("commit", str(v1_dir), "-m", "step1", "--parent", "base")
    v1 = content_hash(v1_dir)
    lora = _peft_folder(
        tmp_path / "lora", load_file(str(tiny_model_dir / "model.safetensors")), 2, 4.0, np.random.default_rng(1)
    )
    cli("commit", str(v1_dir), "-m", "lora", "--lora", str(lora))
    log = cli("log")
    assert "base" in log and "step1" in log and "lora" in log
    assert "xor" in cli("show", v1[:14]) and '"parent"' in cli("show", v1, "--json")
    assert "model.layers.0.mlp.up_proj.weight" in cli("diff", "base", v1)
    cli("tag", "prod", v1)
    cli("checkout", "prod", str(tmp_path / "out"))
    assert content_hash(tmp_path / "out") == v1
    assert "removed 0 blobs" in cli("gc")
    assert "ok" in cli("verify")
    missing = runner.invoke(app, ["models", "checkout", "nope", str(tmp_path / "x"), "--store", root])
    assert isinstance(missing.exception, VersionNotFound)
    bad_tag = runner.invoke(app, ["models", "tag", "prod", "blake3:" + "1" * 64, "--store", root])
    assert isinstance(bad_tag.exception, VersionNotFound)


def test_adapter_parts_are_versioned_in_the_same_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from tpmflow.adapters.parts import PartCard, load_part, save_part
    from tpmflow.errors import VersionNotFound
    from tpmflow.versioning import ModelStore
    from tpmflow.versioning.parts import commit_part, restore_part

    monkeypatch.setenv("TPMFLOW_PARTS", str(tmp_path / "parts"))
    card = PartCard(
        adapter="smiles-fp",
        name="tpsa",
        version="1.0.0",
        kind="ridge-regression",
        modality="molecule",
        base_model="m",
        base_content_hash="blake3:x",
        hidden_size=16,
    )
    rng = np.random.default_rng(0)
    folder = save_part({"weight": rng.random((16, 1), dtype=np.float32), "bias": np.zeros(1, np.float32)}, card)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    store = ModelStore(tmp_path / "store")
    version = commit_part("smiles-fp", "tpsa", store, author="tests")  # the newest version of "tpsa"
    assert store.resolve("part.smiles-fp.tpsa.1.0.0") == version
    shutil.rmtree(folder)
    restored = restore_part("smiles-fp", "tpsa@1.0.0", store)
    assert restored == folder and {p.name: p.read_bytes() for p in restored.iterdir()} == before
    assert load_part("smiles-fp", "tpsa@1.0.0")[1].kind == "ridge-regression"
    with pytest.raises(VersionNotFound):
        restore_part("smiles-fp", "tpsa@9.9.9", store)


def test_tags_cannot_shadow_ids_nor_move_silently(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tpmflow.errors import InvalidRequest
    from tpmflow.versioning import ModelStore
    from tpmflow.versioning.parts import restore_part

    store = ModelStore(tmp_path / "store")
    a = store.commit(tiny_model_dir, "a", "tests", tag="prod")
    for bad in ("44084ccf", a.removeprefix("blake3:")[:12], "blake3x", "../up"):
        with pytest.raises(InvalidRequest, match="bad tag name"):
            store.tag(bad, a)
    (tmp_path / "store" / "refs" / "tags" / "evil").write_text("../../../etc\n")
    with pytest.raises(InvalidRequest, match="not a version id"):
        store.resolve("evil")
    with pytest.raises(InvalidRequest, match="bad part name"):
        restore_part("..", "n@v", store)
    from safetensors.numpy import load_file, save_file

    changed = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed)
    weights = load_file(str(changed / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    save_file(weights, str(changed / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InvalidRequest, match="already points at"):
        store.commit(changed, "b", "tests", tag="prod")  # stored, but "prod" keeps naming a
    assert store.resolve("prod") == a
