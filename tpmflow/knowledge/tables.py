"""The knowledge store's tables, in the pool's database beside principals and the ledger: the
database is the truth (items, their vectors, metadata and provenance); each collection's vector
index is a file rebuilt from it whenever it is missing, stale or corrupt."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from tpmflow.access.tables import Base

NAME_PER_PROJECT = "uq_knowledge_collections_project_name"


class CollectionRow(Base):
    __tablename__ = "knowledge_collections"
    __table_args__ = (
        # Names are unique per project: one project's names say nothing about another's.
        Index(NAME_PER_PROJECT, "project", "name", unique=True),
        {"sqlite_autoincrement": True},  # ids never reused: a dropped collection's caches never match
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    project: Mapped[str] = mapped_column(String(64), index=True)
    visibility: Mapped[str] = mapped_column(String(16))  # private | shared | public
    shared_with: Mapped[str] = mapped_column(Text, default="")  # projects that may read, comma-separated
    embedder: Mapped[str] = mapped_column(Text)  # Embedder as JSON: every vector of the collection comes from it
    dim: Mapped[int] = mapped_column(Integer)
    fields: Mapped[str] = mapped_column(Text, default="[]")  # metadata field names seen, JSON list
    created: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(64))
    # What the items table holds, kept in the same transactions as the items: a search compares it
    # with what its index holds without counting 100,000 rows.
    live: Mapped[int] = mapped_column(BigInteger, default=0)
    max_id: Mapped[int] = mapped_column(BigInteger, default=0)
    deleted: Mapped[int] = mapped_column(BigInteger, default=0)
    billed_until: Mapped[float] = mapped_column(Float, default=0.0)  # storage is billed up to this time
    # Re-embedding for a new model version: the embedder being moved to, while items get their
    # ``next_vector``; ``epoch`` counts completed moves and names the index file of the current one.
    next_embedder: Mapped[str | None] = mapped_column(Text, nullable=True)
    epoch: Mapped[int] = mapped_column(Integer, default=0)


class KnowledgeItemRow(Base):
    __tablename__ = "knowledge_items"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("knowledge_collections.id"), index=True)
    item: Mapped[str] = mapped_column(Text)  # what was embedded, as JSON (a SMILES, a text, a reference)
    meta: Mapped[str] = mapped_column(Text, default="{}")  # properties, results, source: JSON object
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, the collection's dim
    added_by: Mapped[str] = mapped_column(String(64))
    added_at: Mapped[float] = mapped_column(Float)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    next_vector: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # from the next embedder


# Columns added after these tables were first made (``tpmflow.access.db.add_columns`` adds them).
ADDED_COLUMNS = (
    ("knowledge_collections", "billed_until", "FLOAT DEFAULT 0 NOT NULL"),
    ("knowledge_collections", "next_embedder", "TEXT"),
    ("knowledge_collections", "epoch", "INTEGER DEFAULT 0 NOT NULL"),
    ("knowledge_items", "next_vector", "BLOB"),  # BYTEA on PostgreSQL
)
