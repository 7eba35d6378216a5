"""``ModelStore``: commit model folders as versions, check them out bit for bit, and keep the store lean.

Layout under the store root::

    blobs/ab/cdef…        content-addressed blobs (tensor chunks, deltas, LoRA factors, headers, files)
    versions/<hex>.json   one manifest per version, named by the version id
    refs/tags/<name>      tags
    tmp/                  partial writes; nothing here is ever referenced
    lock                  held by writers (commit, tag, gc)

A commit writes blobs first, the manifest second and a tag last, each by atomic rename, so a commit
killed at any point leaves every earlier version intact and only unreferenced blobs behind.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from tpmflow.errors import InvalidRequest, StoreCorrupted, VersionNotFound
from tpmflow.models.build_common import utc_now
from tpmflow.models.card import CARD_FILE, content_hash
from tpmflow.paths import model_store_dir
from tpmflow.versioning.atomic import exclusive, write_atomic
from tpmflow.versioning.blobs import BlobStore, blob_id
from tpmflow.versioning.codecs import CHUNK_SIZE, Encoded, decode, encode_chunks, encode_sparse, encode_xor
from tpmflow.versioning.diff import Status, TensorDiff, VersionDiff, compare
from tpmflow.versioning.lora import Factor, StoredFactors, apply_lora, read_peft
from tpmflow.versioning.manifest import Manifest, TensorRecord, WeightFile
from tpmflow.versioning.refs import Tags, check_tag_name
from tpmflow.versioning.tensorfile import ITEMSIZE, TensorSpan, read_layout, to_float64

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes total) as a commit or checkout proceeds."""

# Other serialisations of the same weights: versioning them too would store every model twice.
SKIPPED_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx"}
_HEX = re.compile(r"^[0-9a-f]{6,64}$")


class GcReport(BaseModel):
    """What ``gc`` removed."""

    removed_blobs: int
    freed_bytes: int
    kept_blobs: int


class VerifyReport(BaseModel):
    """What ``verify`` checked; ``problems`` is empty when the store is sound. Unreferenced blobs
    (left by an interrupted commit) are harmless and only counted."""

    versions: int
    blobs: int
    tensors_rebuilt: int
    unreferenced_blobs: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


class ModelStore:
    """A content-addressed, versioned store of model folders (safetensors + config + tokenizer).

    Args:
        root: the store directory (default ``tpmflow.paths.model_store_dir()``).
        chunk_size: bytes per tensor chunk; unchanged chunks are shared between versions.
        deltas: encode a tensor against its parent's when that is smaller (off: chunk dedup only).
        compress: byte-shuffle + zstd blobs when it saves space.
        max_depth: longest delta chain before a tensor is stored whole again (bounds checkout work).
        durable: fsync every published file (off only for throwaway stores).
    """

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        chunk_size: int = CHUNK_SIZE,
        deltas: bool = True,
        compress: bool = True,
        max_depth: int = 16,
        durable: bool = True,
    ) -> None:
        if chunk_size < 8 or chunk_size & (chunk_size - 1):
            raise InvalidRequest("chunk_size must be a power of two >= 8 (chunks must hold whole elements)")
        self.root = Path(root).expanduser() if root is not None else model_store_dir()
        self.chunk_size, self.deltas, self.compress = chunk_size, deltas, compress
        self.max_depth, self.durable = max_depth, durable
        self.tmp_dir = self.root / "tmp"
        for sub in ("blobs", "versions", "refs/tags", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.root / "blobs", self.tmp_dir, compress=compress, durable=durable)
        self.tags = Tags(self.root / "refs" / "tags", self.tmp_dir)
        self._manifests: dict[str, Manifest] = {}

    def config(self) -> dict[str, Any]:
        """What ``from_config`` needs to open the same store in another process."""
        return {"root": str(self.root), "chunk_size": self.chunk_size, "deltas": self.deltas, "compress": self.compress}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelStore:
        return cls(**config)

    # -- naming --------------------------------------------------------------------------------

    def _manifest_path(self, version: str) -> Path:
        return self.root / "versions" / (version.removeprefix("blake3:") + ".json")

    def versions(self) -> list[str]:
        """Every stored version id."""
        return sorted("blake3:" + p.stem for p in (self.root / "versions").glob("*.json"))

    def resolve(self, name_or_id: str) -> str:
        """A tag, a full version id, or a unique prefix of one (6+ hex digits) -> the version id."""
        name = name_or_id.strip()
        tagged = self.tags.get(name)
        if tagged is not None:
            if not self._manifest_path(tagged).is_file():
                raise StoreCorrupted(f"tag {name} points at {tagged}, which is not in the store")
            return tagged
        digits = name.removeprefix("blake3:")
        if _HEX.match(digits):
            if len(digits) == 64 and self._manifest_path(digits).is_file():
                return "blake3:" + digits
            matches = [v for v in self.versions() if v[7:].startswith(digits)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise InvalidRequest(f"{name!r} is ambiguous: {len(matches)} versions start with it")
        raise VersionNotFound(f"no version or tag {name!r} in the model store at {self.root}")

    def show(self, name_or_id: str) -> Manifest:
        """The manifest of a version (tag, id or prefix)."""
        version = self.resolve(name_or_id)
        if version not in self._manifests:
            path = self._manifest_path(version)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise VersionNotFound(f"version {version} is not in the model store at {self.root}") from None
            self._manifests[version] = Manifest.from_json(data, version)
        return self._manifests[version]

    def log(self, start: str | None = None) -> list[Manifest]:
        """Versions newest first: the ancestry of ``start`` if given, else every version."""
        if start is None:
            return sorted((self.show(v) for v in self.versions()), key=lambda m: (m.created, m.id), reverse=True)
        out: list[Manifest] = []
        version: str | None = self.resolve(start)
        while version is not None and len(out) <= len(self.versions()):
            manifest = self.show(version)
            out.append(manifest)
            version = manifest.parent
        return out

    def tag(self, name: str, version: str, *, force: bool = False) -> str:
        """Point tag ``name`` at a version; moving an existing tag needs ``force``."""
        check_tag_name(name)
        target = self.resolve(version)
        with exclusive(self.root / "lock"):
            current = self.tags.get(name)
            if current not in (None, target) and not force:
                raise InvalidRequest(f"tag {name} already points at {current}; pass force to move it")
            self.tags.set(name, target)
        return target

    # -- commit --------------------------------------------------------------------------------

    def commit(
        self,
        model_dir: Path | str | None,
        message: str,
        author: str,
        parent: str | None = None,
        lora: Path | str | None = None,
        *,
        metrics: dict[str, Any] | None = None,
        tag: str | None = None,
        progress: Progress | None = None,
    ) -> str:
        """Store a model folder as a new version and return its id (the folder's content hash).

        Dense: ``model_dir``'s weights, each tensor stored whole or as a delta against ``parent``'s,
        whichever is smallest. LoRA: ``lora`` is a PEFT folder applied to the base, which is
        ``parent`` or, if ``model_dir`` is given, the stored version equal to that folder (whose
        config and tokenizer files are then used). Committing weights already stored returns the
        existing version unchanged.
        """
        if tag is not None:
            check_tag_name(tag)
        if lora is not None:
            return self._commit_lora(model_dir, Path(lora), message, author, parent, metrics, tag, progress)
        if model_dir is None:
            raise InvalidRequest("commit needs a model folder (or a LoRA folder and a parent)")
        folder = self._model_folder(Path(model_dir))
        layouts = [read_layout(p) for p in sorted(folder.glob("*.safetensors"))]
        names = [s.name for layout in layouts for s in layout.tensors]
        if len(set(names)) != len(names):
            raise InvalidRequest(f"{folder}: a tensor name occurs in more than one weight file")
        parent_id = self.resolve(parent) if parent is not None else None
        total = sum(layout.path.stat().st_size for layout in layouts)
        version = content_hash(folder)
        files = _read_files(folder)
        if metrics is None:
            metrics = _card_metrics(files, version)
        files = _restamp_card(files, version)  # a card copied along with changed weights must not lie
        with exclusive(self.root / "lock"):
            if (existing := self._existing(version, files, tag)) is not None:
                return existing
            parent_manifest = self.show(parent_id) if parent_id else None
            records: dict[str, TensorRecord] = {}
            weights, done = [], 0
            for layout in layouts:
                data = layout.data()
                header = self.blobs.put(np.frombuffer(layout.header, np.uint8))
                for span in layout.tensors:
                    records[span.name] = self._encode(span, data[span.begin : span.end], parent_id, parent_manifest)
                    done += span.nbytes
                    if progress:
                        progress(done, total)
                weights.append(
                    WeightFile(name=layout.path.name, header=header, tensors=[s.name for s in layout.tensors])
                )
            if content_hash(folder) != version:
                raise InvalidRequest(f"{folder} changed while it was being committed; commit it again")
            manifest = Manifest(
                id=version,
                parent=parent_id,
                message=message,
                author=author,
                created=utc_now(),
                metrics=metrics,
                lora=None,
                weights=weights,
                tensors=records,
                files={path: self.blobs.put(np.frombuffer(data, np.uint8)) for path, data in files.items()},
            )
            self._publish(manifest, tag)
        return version

    def _model_folder(self, folder: Path) -> Path:
        if not folder.is_dir():
            raise InvalidRequest(f"{folder} is not a folder")
        if not any(folder.glob("*.safetensors")):
            raise InvalidRequest(f"no *.safetensors weight files in {folder}: the store versions safetensors models")
        return folder

    def _existing(self, version: str, files: dict[str, bytes], tag: str | None) -> str | None:
        """The version if these exact weights are stored already; their other files must match too,
        since the id covers the weights only and a version never changes."""
        if not self._manifest_path(version).is_file():
            return None
        stored = self.show(version).files
        if {path: blob_id(data) for path, data in files.items()} != stored:
            raise InvalidRequest(
                f"these weights are already stored as {version} with different config or tokenizer files; "
                "a version's files never change (the id covers the weights only)"
            )
        if tag is not None:
            self._set_new_tag(tag, version)
        return version

    def _set_new_tag(self, tag: str, version: str) -> None:
        """A commit's ``tag`` names what it committed; moving a tag that names another version
        needs ``tag(..., force=True)`` (a part's tag, say, must keep naming the weights results cite)."""
        current = self.tags.get(tag)
        if current not in (None, version):
            raise InvalidRequest(f"tag {tag} already points at {current}; move it with `tag --force`")
        self.tags.set(tag, version)

    def _encode(
        self, span: TensorSpan, raw: np.ndarray, parent: str | None, parent_manifest: Manifest | None
    ) -> TensorRecord:
        """Store one tensor the cheapest way: unchanged -> the parent's record; else whole chunks or a
        delta against the parent, whichever adds fewest bytes (ties go to chunks: no chain)."""
        digest = blob_id(raw)
        base = parent_manifest.tensors.get(span.name) if parent_manifest else None
        same_kind = base is not None and base.dtype == span.dtype and base.shape == list(span.shape)
        if base is not None and same_kind and base.hash == digest:
            return base
        candidates: list[Encoded] = [encode_chunks(raw, span.dtype, self.blobs, self.chunk_size)]
        if self.deltas and base is not None and same_kind and base.depth < self.max_depth and parent is not None:
            base_raw = self._rebuild(span.name, base)
            sparse = encode_sparse(raw, base_raw, span.dtype, self.blobs)
            candidates += [encode_xor(raw, base_raw, span.dtype, self.blobs, self.chunk_size)]
            candidates += [sparse] if sparse is not None else []
        best = min(candidates, key=lambda c: c.cost)
        for blob in best.blobs:
            self.blobs.write(blob)
        delta = best.encoding != "chunks"
        record = TensorRecord(
            dtype=span.dtype,
            shape=list(span.shape),
            nbytes=span.nbytes,
            hash=digest,
            encoding=best.encoding,  # type: ignore[arg-type]
            blobs=[b.id for b in best.blobs],
            base=parent if delta else None,
            depth=base.depth + 1 if delta and base is not None else 0,
            params=best.params,
        )
        if delta and blob_id(self._rebuild(span.name, record)) != digest:
            raise StoreCorrupted(f"the {best.encoding} delta of {span.name} does not rebuild it (a codec bug)")
        return record

    def _commit_lora(
        self,
        model_dir: Path | str | None,
        lora: Path,
        message: str,
        author: str,
        parent: str | None,
        metrics: dict[str, Any] | None,
        tag: str | None,
        progress: Progress | None,
    ) -> str:
        updates, summary = read_peft(lora)
        if model_dir is not None:
            folder = self._model_folder(Path(model_dir))
            base_id = content_hash(folder)
            if parent is not None and self.resolve(parent) != base_id:
                raise InvalidRequest(f"{folder} holds {base_id}, not the parent {parent} the LoRA was given")
            if not self._manifest_path(base_id).is_file():
                raise VersionNotFound(f"the base model {folder} ({base_id}) is not in the store; commit it first")
            parent_id, files = base_id, _read_files(folder)
        elif parent is None:
            raise InvalidRequest("a LoRA commit needs the base model's folder or a parent version")
        else:
            parent_id = self.resolve(parent)
            files = {path: self.blobs.get(b).tobytes() for path, b in self.show(parent_id).files.items()}
        base = self.show(parent_id)
        records = dict(base.tensors)
        rebuilt: dict[str, np.ndarray] = {}
        total = sum(records[u.target].nbytes for u in updates if u.target in records)
        done = 0
        with exclusive(self.root / "lock"):
            for update in updates:
                old = records.get(update.target)
                if old is None:
                    raise InvalidRequest(f"the adapter updates {update.target}, which version {parent_id} lacks")
                new = apply_lora(
                    self._rebuild(update.target, old),
                    old.dtype,
                    tuple(old.shape),
                    update.a.values(),
                    update.b.values(),
                    update.scale,
                    update.transpose,
                )
                rebuilt[update.target] = new
                if old.depth >= self.max_depth:  # chain too long: store this one whole
                    encoded, params, delta = encode_chunks(new, old.dtype, self.blobs, self.chunk_size), {}, False
                else:
                    factors = [self.blobs.prepare(f.raw, ITEMSIZE[f.dtype]) for f in (update.a, update.b)]
                    encoded, params, delta = Encoded("lora", factors), update.params(), True
                for blob in encoded.blobs:
                    self.blobs.write(blob)
                records[update.target] = TensorRecord(
                    dtype=old.dtype,
                    shape=old.shape,
                    nbytes=old.nbytes,
                    hash=blob_id(new),
                    encoding=encoded.encoding,  # type: ignore[arg-type]
                    blobs=[b.id for b in encoded.blobs],
                    base=parent_id if delta else None,
                    depth=old.depth + 1 if delta else 0,
                    params=params,
                )
                done += old.nbytes
                if progress:
                    progress(done, total)
            # The id is the content hash of what a checkout writes, computed by the one definition of it.
            with self._scratch() as scratch:
                self._write_weights(base.weights, records, scratch, known=rebuilt)
                version = content_hash(scratch)
            files = _restamp_card(files, version)
            if (existing := self._existing(version, files, tag)) is not None:
                return existing
            manifest = Manifest(
                id=version,
                parent=parent_id,
                message=message,
                author=author,
                created=utc_now(),
                metrics=metrics or {},
                lora=summary,
                weights=base.weights,
                tensors=records,
                files={path: self.blobs.put(np.frombuffer(data, np.uint8)) for path, data in files.items()},
            )
            self._publish(manifest, tag)
        return version

    def _publish(self, manifest: Manifest, tag: str | None) -> None:
        """Manifest after its blobs, tag after its manifest: each step is one atomic rename."""
        write_atomic(self._manifest_path(manifest.id), manifest.to_json(), self.tmp_dir, durable=self.durable)
        self._manifests[manifest.id] = manifest
        if tag is not None:
            self._set_new_tag(tag, manifest.id)  # the version is stored even if its tag is taken

    @contextmanager
    def _scratch(self) -> Iterator[Path]:
        path = Path(tempfile.mkdtemp(dir=self.tmp_dir, prefix="scratch."))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    # -- read ----------------------------------------------------------------------------------

    def _rebuild(self, name: str, record: TensorRecord) -> np.ndarray:
        """A tensor's raw bytes: follow its delta chain down to whole chunks, then apply the deltas
        upwards, checking each step's blake3 against its record."""
        chain, visited = [record], set()
        while chain[-1].encoding != "chunks":
            if chain[-1].base is None or chain[-1].base in visited:
                raise StoreCorrupted(f"tensor {name}: a {chain[-1].encoding} record without a usable base")
            visited.add(chain[-1].base)
            base = self.show(chain[-1].base).tensors.get(name)
            if base is None:
                raise StoreCorrupted(f"tensor {name}: its base version {chain[-1].base} lacks it")
            chain.append(base)
        data: np.ndarray | None = None
        for step in reversed(chain):
            if step.encoding == "lora":
                assert data is not None
                a, b = (self.blobs.get(bid) for bid in step.blobs)
                p = step.params
                data = apply_lora(
                    data,
                    step.dtype,
                    tuple(step.shape),
                    to_float64(a, p["a"]["dtype"]).reshape(p["a"]["shape"]),
                    to_float64(b, p["b"]["dtype"]).reshape(p["b"]["shape"]),
                    p["scale"],
                    p["transpose"],
                )
            else:
                data = decode(step.encoding, step.blobs, step.params, data, step.dtype, self.blobs)
            if data.size != step.nbytes or blob_id(data) != step.hash:
                raise StoreCorrupted(f"tensor {name} rebuilds to different bytes than recorded ({step.encoding})")
        assert data is not None
        return data

    def tensor(self, version: str, name: str) -> np.ndarray:
        """One tensor's raw bytes (uint8) as stored in a version, verified."""
        manifest = self.show(version)
        if name not in manifest.tensors:
            raise InvalidRequest(f"version {manifest.id} has no tensor {name!r}")
        return self._rebuild(name, manifest.tensors[name])

    def lora_factors(self, version: str) -> tuple[str, list[StoredFactors]]:
        """The parent and the stored factors of a version committed as one LoRA on its parent, for
        serving it as a vLLM adapter on the parent's weights.

        Refused (``InvalidRequest``, with the reason) when the version is not exactly "parent +
        factors": not a LoRA commit, a tensor stored whole (delta chain at its cap) or otherwise
        changed, or a transposed update (embeddings, ``fan_in_fan_out``), which vLLM cannot apply.
        """
        manifest = self.show(version)
        if manifest.lora is None or manifest.parent is None:
            raise InvalidRequest(f"version {manifest.id} was not committed as LoRA factors")
        parent = self.show(manifest.parent)
        factors = []
        for name, record in sorted(manifest.tensors.items()):
            if record.encoding == "lora" and record.base == parent.id:
                p = record.params
                if p["transpose"]:
                    raise InvalidRequest(f"{name}: a transposed (embedding or fan_in_fan_out) update")
                a, b = (self.blobs.get(bid) for bid in record.blobs)
                factors.append(
                    StoredFactors(
                        module=name.removesuffix(".weight"),
                        a=Factor(a, p["a"]["dtype"], tuple(p["a"]["shape"])),
                        b=Factor(b, p["b"]["dtype"], tuple(p["b"]["shape"])),
                        scale=float(p["scale"]),
                    )
                )
            elif record.hash != getattr(parent.tensors.get(name), "hash", None):
                raise InvalidRequest(f"{name} changed beyond the LoRA factors (stored {record.encoding})")
        return parent.id, factors

    def _write_weights(
        self,
        weights: list[WeightFile],
        records: dict[str, TensorRecord],
        out: Path,
        progress: Progress | None = None,
        known: dict[str, np.ndarray] | None = None,
    ) -> None:
        total, done = sum(r.nbytes for r in records.values()), 0
        for weight_file in weights:
            with (out / weight_file.name).open("wb") as fh:
                fh.write(self.blobs.get(weight_file.header).data)
                for name in weight_file.tensors:
                    data = (known or {}).get(name)
                    fh.write((data if data is not None else self._rebuild(name, records[name])).data)
                    done += records[name].nbytes
                    if progress:
                        progress(done, total)

    def checkout(self, version: str, dest: Path | str, *, progress: Progress | None = None) -> Path:
        """Materialise a version as a model folder that vLLM and transformers load, bit-identical to
        what was committed; the whole folder appears at once and its content hash is checked."""
        manifest = self.show(version)
        dest = Path(dest)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise InvalidRequest(f"{dest} exists and is not an empty folder")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        try:
            tmp.chmod(0o755)
            self._write_weights(manifest.weights, manifest.tensors, tmp, progress)
            for path, bid in manifest.files.items():
                (tmp / path).parent.mkdir(parents=True, exist_ok=True)
                (tmp / path).write_bytes(self.blobs.get(bid).data)
            if content_hash(tmp) != manifest.id:
                raise StoreCorrupted(f"checkout of {manifest.id} does not hash to its id")
            if dest.exists():
                dest.rmdir()
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    def diff(self, a: str, b: str) -> VersionDiff:
        """Which tensors changed from ``a`` to ``b`` and by how much, and which other files changed."""
        ma, mb = self.show(a), self.show(b)
        tensors = []
        for name in sorted(set(ma.tensors) | set(mb.tensors)):
            ra, rb = ma.tensors.get(name), mb.tensors.get(name)
            if ra is None or rb is None:
                record = rb if ra is None else ra
                assert record is not None
                count = record.nbytes // ITEMSIZE.get(record.dtype, 1)
                status: Status = "added" if ra is None else "removed"
                tensors.append(TensorDiff(name=name, status=status, elements=count, fraction_changed=1.0))
            elif ra.dtype != rb.dtype or ra.shape != rb.shape:
                count = rb.nbytes // ITEMSIZE.get(rb.dtype, 1)
                tensors.append(TensorDiff(name=name, status="retyped", elements=count, fraction_changed=1.0))
            elif ra.hash == rb.hash:
                count = ra.nbytes // ITEMSIZE.get(ra.dtype, 1)
                tensors.append(
                    TensorDiff(name=name, status="unchanged", elements=count, fraction_changed=0.0, relative_l2=0.0)
                )
            else:
                tensors.append(compare(name, self._rebuild(name, ra), self._rebuild(name, rb), ra.dtype))
        files: dict[str, Any] = {}
        for path in sorted(set(ma.files) | set(mb.files)):
            if path not in mb.files:
                files[path] = "removed"
            elif path not in ma.files:
                files[path] = "added"
            elif ma.files[path] != mb.files[path]:
                files[path] = "changed"
        return VersionDiff(a=ma.id, b=mb.id, tensors=tensors, files=files)

    # -- upkeep --------------------------------------------------------------------------------

    def _referenced(self) -> set[str]:
        ids: set[str] = set()
        for version in self.versions():
            ids |= self.show(version).blob_ids()
        return ids

    def gc(self) -> GcReport:
        """Delete blobs no version references (debris of interrupted commits) and stale temp files.

        Every committed version is kept: version ids appear in provenance records, so they must keep
        checking out. An unreadable manifest aborts ``gc`` rather than risk deleting its blobs.
        """
        with exclusive(self.root / "lock"):
            referenced = self._referenced()
            removed = freed = kept = 0
            for bid in list(self.blobs.ids()):
                if bid in referenced:
                    kept += 1
                else:
                    freed += self.blobs.remove(bid)
                    removed += 1
            for leftover in self.tmp_dir.iterdir():  # no writer runs while we hold the lock
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
        return GcReport(removed_blobs=removed, freed_bytes=freed, kept_blobs=kept)

    def verify(self, *, deep: bool = True) -> VerifyReport:
        """Check every blob against its hash, every manifest's references and tag, and (``deep``)
        rebuild every tensor of every version against its recorded blake3."""
        problems: list[str] = []
        on_disk = set()
        for bid in self.blobs.ids():
            on_disk.add(bid)
            try:
                self.blobs.get(bid)
            except StoreCorrupted as exc:
                problems.append(str(exc))
        referenced: set[str] = set()
        seen: set[tuple[str, str]] = set()
        versions = self.versions()
        for version in versions:
            try:
                manifest = self.show(version)
            except StoreCorrupted as exc:
                problems.append(str(exc))
                continue
            referenced |= manifest.blob_ids()
            problems += [f"{version} references missing blob {b}" for b in sorted(manifest.blob_ids() - on_disk)]
            if manifest.parent and manifest.parent not in versions:
                problems.append(f"{version}: parent {manifest.parent} is not in the store")
            if not deep:
                continue
            for name, record in manifest.tensors.items():
                if (name, record.hash) in seen:
                    continue
                try:
                    self._rebuild(name, record)
                    seen.add((name, record.hash))
                except (StoreCorrupted, InvalidRequest) as exc:
                    problems.append(f"{version}: {exc}")
        for name, target in self.tags.all().items():
            if target not in versions:
                problems.append(f"tag {name} points at missing version {target}")
        return VerifyReport(
            versions=len(versions),
            blobs=len(on_disk),
            tensors_rebuilt=len(seen),
            unreferenced_blobs=len(on_disk - referenced),
            problems=problems,
        )

    def disk_usage(self) -> int:
        """Bytes the store occupies (blobs, manifests, tags; not temp files)."""
        return sum(
            p.stat().st_size
            for sub in ("blobs", "versions", "refs")
            for p in (self.root / sub).rglob("*")
            if p.is_file()
        )


def _read_files(folder: Path) -> dict[str, bytes]:
    """The non-weight files of a model folder (config, tokenizer, generation config, card…), by
    relative path; hidden entries and other serialisations of the weights are left out."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix in SKIPPED_SUFFIXES or (path.suffix == ".safetensors" and len(rel.parts) == 1):
            continue
        files[rel.as_posix()] = path.read_bytes()
    return files


def _card_metrics(files: dict[str, bytes], version: str) -> dict[str, Any]:
    """A tpmflow card's metrics, when the card describes exactly these weights."""
    import json

    try:
        card = json.loads(files[CARD_FILE])
    except (KeyError, ValueError):
        return {}
    metrics = card.get("metrics") if card.get("content_hash") == version else None
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, int | float)}


def _restamp_card(files: dict[str, bytes], version: str) -> dict[str, bytes]:
    """A card must name the weights beside it: a LoRA version inherits its base's card, and a
    fine-tuned folder often carries its parent's. Replicas report the card's hash as the version
    they serve, so a stale one would put the wrong version in provenance (and pin requests to the
    wrong replica)."""
    import json

    if CARD_FILE not in files:
        return files
    try:
        card = json.loads(files[CARD_FILE])
    except ValueError:
        return files
    if card.get("content_hash") == version:
        return files
    card["content_hash"] = version
    card["metrics"] = None  # they were measured on the base weights
    return {**files, CARD_FILE: (json.dumps(card, indent=2) + "\n").encode()}
