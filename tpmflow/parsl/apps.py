"""``@tpm_app``: a Parsl python app whose function gets a connected pool ``Client`` first.

    @tpm_app(executors=["sim"])
    def score(client, smiles: list[str]) -> list[float]:
        return client.predict(smiles, adapter="smiles", head="tpsa").values

    future = score(["CCO", "c1ccccc1"])          # an AppFuture, like any Parsl app

The pool's URL and token are read when the app is called (``url=``/``token=`` on the decorator,
else ``$TPMFLOW_URL`` / ``$TPMFLOW_TOKEN``) and travel with the task; the worker opens a client,
runs the function and closes it. The function runs on a Parsl worker, so it must import what it
uses inside its body, and workers must be able to import it: define it in the campaign script
(sent by value) or in a module on the workers' path.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any


def run_with_client(url: str, token: str, fn_bytes: bytes, *args: Any, **kwargs: Any) -> Any:
    """Body of every ``tpm_app`` task, on the worker."""
    import dill

    from tpmflow.client import Client

    fn = dill.loads(fn_bytes)  # from the campaign that submitted the task
    with Client(url, token=token) as client:
        return fn(client, *args, **kwargs)


def tpm_app(
    fn: Callable[..., Any] | None = None,
    *,
    executors: list[str] | str = "all",
    url: str | None = None,
    token: str | None = None,
) -> Any:
    """Decorate ``fn(client, ...)`` into a Parsl app called as ``fn(...)``."""

    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        import dill
        from parsl import python_app

        app = python_app(run_with_client, executors=executors)
        # dill sends a function of the campaign script (__main__) by value, one of a module by name.
        fn_bytes = dill.dumps(func)

        @functools.wraps(func)
        def submit(*args: Any, **kwargs: Any) -> Any:
            pool_url = url or os.environ.get("TPMFLOW_URL")
            pool_token = token or os.environ.get("TPMFLOW_TOKEN")
            if not pool_url or not pool_token:
                raise RuntimeError("tpm_app needs the pool: pass url= and token=, or set TPMFLOW_URL and TPMFLOW_TOKEN")
            return app(pool_url, pool_token, fn_bytes, *args, **kwargs)

        return submit

    return wrap(fn) if fn is not None else wrap
