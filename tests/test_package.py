"""The package imports, exposes its public names, and its errors map to HTTP bodies."""

import pytest

import tpmflow
from tpmflow import errors


def test_version_is_public() -> None:
    assert tpmflow.__version__.count(".") == 2


@pytest.mark.parametrize(
    ("cls", "status"),
    [
        (errors.InvalidRequest, 400),
        (errors.AdapterInputError, 400),
        (errors.Unauthorized, 401),
        (errors.Forbidden, 403),
        (errors.QuotaExceeded, 429),
        (errors.Overloaded, 503),
        (errors.ReplicaFailed, 502),
    ],
)
def test_error_classes_carry_status_and_body(cls: type[errors.TpmflowError], status: int) -> None:
    err = cls("bad thing", item=3)
    assert err.status_code == status
    assert err.to_body() == {"error": {"type": cls.__name__, "message": "bad thing", "item": 3}}
    assert errors.ERROR_CLASSES[cls.__name__] is cls


def test_model_not_found_names_the_build_command(tmp_path, monkeypatch) -> None:
    from tpmflow.models.catalog import model_path

    monkeypatch.setenv("TPMFLOW_HOME", str(tmp_path))
    with pytest.raises(errors.ModelNotFound, match="tpmflow models build-demo"):
        model_path("smiles-llama")


def test_http_statuses_map_to_error_classes() -> None:
    expected = {
        400: "InvalidRequest",
        401: "Unauthorized",
        403: "Forbidden",
        404: "ModelNotFound",
        413: "PayloadTooLarge",
        429: "QuotaExceeded",
        502: "ReplicaFailed",
        503: "Overloaded",
        504: "ReplicaFailed",
        500: "ReplicaFailed",
        418: "InvalidRequest",
    }
    assert {s: errors.type_for_status(s) for s in expected} == expected
