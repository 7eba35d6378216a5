"""Workshop mode's one step (``tpmflow.access.workshop``), on SQLite and PostgreSQL, and its CLI.
The workbench's workshop page calls the same function (tests/test_workbench.py drives it)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from test_cli import tpmflow

from tpmflow.access.workshop import open_workshop
from tpmflow.errors import InvalidRequest


def test_a_workshop_is_principals_a_class_an_allocation_with_equal_caps_and_tokens(access: Any) -> None:
    name = "ws" + uuid.uuid4().hex[:6]  # PostgreSQL's database outlives the test
    made = open_workshop(access, name, 12, "batch", 60.0, known_classes={"interactive", "batch"})
    assert [p.principal for p in made] == [f"{name}-{i:02d}" for i in range(1, 13)]
    for p in made:
        who = access.authenticate(p.token)
        assert (who.name, who.project, who.service_class) == (p.principal, name, "batch")
        assert who.can("probe") and not who.can("admin")
    (alloc,) = access.allocations.show(name)
    assert alloc["granted_su"] == 60 and set(alloc["caps"]) == {p.principal for p in made}
    assert all(c["cap_su"] == pytest.approx(5.0) for c in alloc["caps"].values())
    with pytest.raises(InvalidRequest, match="already has principals"):
        open_workshop(access, name, 2, "batch", 10.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", 3, "batch", 10.0), "workshop name"),
        (("a b", 3, "batch", 10.0), "workshop name"),
        (("w", 0, "batch", 10.0), "1 to 500 participants"),
        (("w", 501, "batch", 10.0), "1 to 500 participants"),
        (("w", 3, "batch", 0.0), "positive number of SU"),
        (("w", 3, "gold", 10.0), "service class 'gold' is not in the pool config"),
    ],
)
def test_bad_workshops_are_refused_before_anything_is_written(tmp_path: Path, args: tuple[Any, ...], message: str) -> None:
    from tpmflow.access import AccessDB

    db = AccessDB(f"sqlite:///{tmp_path / 'a.db'}")
    with pytest.raises(InvalidRequest, match=message):
        open_workshop(db, *args, known_classes={"interactive", "batch"})
    assert db.principals() == [] and db.allocations.show(None) == []


def test_the_cli_opens_a_workshop_and_prints_the_tokens(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    out = tpmflow("workshop", "open", "school", "-n", "3", "--su", "9", "--class", "batch", "--database-url", url)
    assert out.returncode == 0, out.stderr
    tokens = [word for word in out.stdout.split() if word.startswith("tpm_")]
    assert len(tokens) == 3 and "school-03" in out.stdout and "3 each" in out.stdout
    from tpmflow.access import AccessDB

    assert AccessDB(url).authenticate(tokens[2]).name == "school-03"


def test_a_workshop_never_takes_over_existing_principals_and_refuses_absurd_grants(tmp_path: Path) -> None:
    from tpmflow.access import AccessDB

    db = AccessDB(f"sqlite:///{tmp_path / 'a.db'}")
    db.ensure_principal("lab-02", "physics", {"generate", "admin"})
    with pytest.raises(InvalidRequest, match="lab-02 already exist"):
        open_workshop(db, "lab", 3, "batch", 10.0)
    assert db.authenticate(db.create_token("lab-02")).can("admin"), "untouched"
    assert db.allocations.show("lab") == [], "nothing written"
    for su in (float("inf"), float("nan"), 2e9):
        with pytest.raises(InvalidRequest, match="positive number of SU"):
            open_workshop(db, "other", 3, "batch", su)
    with pytest.raises(InvalidRequest, match="ASCII"):
        open_workshop(db, "wörkshop", 3, "batch", 10.0)
