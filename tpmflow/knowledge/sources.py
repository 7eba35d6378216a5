"""Where a collection's items come from, as ``(item, metadata)`` pairs a ``Writer`` takes: a run
folder's CSV, ProxyStore references (resolved here and sent as plain items, never as proxies),
or a Colmena result stream (``TPMThinker.remember_result`` records each result as it arrives),
or documentation (a Markdown file's sections, for a text collection).

    with client.knowledge("runs").writer() as out:
        ingest(out, csv_rows("runs/design/simulations.csv", item_column="smiles"))
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

Pair = tuple[Any, dict[str, Any]]


class Sink(Protocol):
    def put(self, item: Any, metadata: dict[str, Any] | None = None) -> None: ...


def ingest(sink: Sink, pairs: Iterable[Pair]) -> int:
    """Put every pair into ``sink`` (a ``Writer``: batched, in the background); returns how many."""
    n = 0
    for item, metadata in pairs:
        sink.put(item, metadata)
        n += 1
    return n


def number(value: str | None) -> Any:
    """A CSV cell as an int or float when it reads as one, else the text (None: a short row's
    missing cell; NaN and infinities stay text, since JSON cannot hold them)."""
    if value is None:
        return None
    try:
        parsed = float(value) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        return value
    return parsed if math.isfinite(parsed) else value


def csv_rows(path: str | Path, item_column: str = "item") -> Iterator[Pair]:
    """Rows of a CSV: ``item_column`` is the item, the other columns its metadata (numbers parsed),
    with ``source`` set to the file unless the CSV has a column of that name."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or item_column not in reader.fieldnames:
            raise ValueError(f"{path} has no {item_column!r} column (it has {reader.fieldnames or []})")
        for row in reader:
            item = row.pop(item_column)
            yield item, {"source": str(path), **{k: number(v) for k, v in row.items() if k is not None}}


def resolved(pairs: Iterable[Pair]) -> Iterator[Pair]:
    """Pairs whose items or metadata hold ProxyStore proxies, with each proxy resolved here (the
    pool takes plain items; a pickled proxy never reaches it)."""
    from tpmflow.colmena import plain

    for item, metadata in pairs:
        yield plain(item), plain(metadata)


def result_pair(
    result: Any,
    item: Callable[[Any], Any] | None = None,
    metadata: Callable[[Any], dict[str, Any]] | None = None,
) -> Pair:
    """A Colmena ``Result`` as a pair: by default its first argument is the item, and its value (when
    a number, string or bool), method, topic and task id the metadata. Proxies are resolved."""
    from tpmflow.colmena import plain

    args = result.args if result.args else (None,)
    chosen = item(result) if item is not None else args[0]
    if metadata is not None:
        meta = metadata(result)
    else:
        meta = {"method": result.method, "topic": result.topic, "task_id": result.task_id, "source": "colmena"}
        value = plain(result.value)
        if isinstance(value, float) and not math.isfinite(value):
            value = None  # JSON holds no NaN: a failed result's value is recorded as missing
        if isinstance(value, int | float | str | bool) or value is None:
            meta["value"] = value
    return plain(chosen), plain(meta)


_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
SECTION_WORDS = 150  # a text embedder reads 256 tokens of an item (MiniLM): longer sections are split


def markdown_sections(path: str | Path, max_words: int = SECTION_WORDS) -> Iterator[Pair]:
    """A Markdown file's sections, each its heading path and text, long ones in parts of at most
    ``max_words`` words (split between paragraphs where it can), so a text embedder reads all of
    every item. Metadata: ``source``, ``heading`` (outline path, " > " between levels), ``line``
    (where the section starts). Headings inside fenced code (``` or ~~~) are code, not headings."""
    if max_words < 1:
        raise ValueError(f"max_words must be at least 1, not {max_words}")
    path = Path(path)
    outline: list[tuple[int, str]] = []  # (level, title) of the headings above the current line
    body: list[str] = []
    start, fence = 1, ""

    def parts() -> Iterator[Pair]:
        text = "\n".join(body).strip()
        if not text:
            return
        heading = " > ".join(title for _, title in outline)
        meta = {"source": path.name, "heading": heading, "line": start}
        chunk: list[str] = []
        for paragraph in _split(text, max_words):
            if chunk and len(" ".join(chunk).split()) + len(paragraph.split()) > max_words:
                yield _item(heading, chunk), dict(meta)
                chunk = []
            chunk.append(paragraph)
        if chunk:
            yield _item(heading, chunk), dict(meta)

    for number_, line in enumerate(path.read_text().splitlines(), 1):
        opened = _FENCE.match(line)
        if fence:  # inside a fence: only its own closing fence (same character, at least as long) ends it
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence):
                fence = ""
            body.append(line)
            continue
        if opened:
            fence = opened.group(1)
            body.append(line)
            continue
        match = _HEADING.match(line)
        if match is None or not match.group(2):
            body.append(line)
            continue
        yield from parts()
        level = len(match.group(1))
        while outline and outline[-1][0] >= level:
            outline.pop()
        outline.append((level, match.group(2)))
        body, start = [], number_
    yield from parts()


def _item(heading: str, paragraphs: list[str]) -> str:
    text = "\n\n".join(paragraphs)
    return f"{heading}\n{text}" if heading else text


def _split(text: str, max_words: int) -> Iterator[str]:
    """Paragraphs of ``text``; one longer than ``max_words`` words is cut into pieces that long."""
    for paragraph in re.split(r"\n\s*\n", text):
        words = paragraph.split()
        if len(words) <= max_words:
            if words:
                yield paragraph.strip()
            continue
        for i in range(0, len(words), max_words):
            yield " ".join(words[i : i + max_words])
