"""Colmena integration: the pool inside thinkers, and the pool's calls as ordinary Colmena tasks.

Two ways to call the pool from a campaign, both on the same gateway, ledger and replicas:

* From a thinker agent, through :class:`TPMThinker`: ``self.tpm`` is a connected pool client,
  and ``self.submit_tpm("embed", items, topic="tpm")`` returns at once; the answer arrives at the
  ``@result_processor(topic="tpm")`` agent as a Colmena ``Result``, with its timing fields, exactly
  like a simulation's result. Nothing in the agent waits on the model, so the thinker's other
  agents go on submitting and receiving simulations.
* As tasks a ``ParslTaskServer`` runs, through :func:`tpm_methods`: ``tpm_generate``,
  ``tpm_embed``, ``tpm_predict`` and ``tpm_probe`` sit in the same queue as the simulations, with
  topics, resources, retries and ProxyStore thresholds. Colmena's proxies are pickled objects:
  they are resolved on the worker and travel to the pool as plain payloads (large ones as the
  pool's own signed references), never as proxies.

:func:`split_site` builds, from one site file, the Parsl config of the pool's replica executor
(the thinker's process, where the pool's launcher restarts dead replicas) and that of the task
server's simulation executors (its own process: a Parsl DataFlowKernel cannot be shared between
processes, and Colmena's task server loads its own).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from colmena.models.methods import PythonMethod
from colmena.models.results import FailureInformation, Result
from colmena.queue.base import ColmenaQueues
from colmena.queue.python import PipeQueues
from colmena.thinker import BaseThinker

from tpmflow.client import Client, Embeddings, Trace
from tpmflow.client.knowledge import Writer
from tpmflow.knowledge.sources import result_pair


class SafePipeQueues(PipeQueues):
    """Colmena's ``PipeQueues``, sending whole messages when several threads send at once.

    A ``ParslTaskServer`` sends each result from the thread that completed its task. On a Parsl
    ``ThreadPoolExecutor`` — where ``tpm_*`` tasks belong, since they only wait for the pool —
    several threads send on one pipe at once, ``PipeQueues`` interleaves their bytes, and the
    thinker waits forever for a result that arrived garbled. This lock serialises the sends of
    each process: a process the queues reach by fork or by pickle makes its own on first use, so
    a lock held by a thread of the parent at fork time cannot block the child.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._locks: dict[int, threading.Lock] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_locks", None)
        return state  # type: ignore[no-any-return]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._locks = {}

    def _send_lock(self) -> threading.Lock:
        # setdefault is atomic under the GIL: the threads of one process agree on one lock.
        return self._locks.setdefault(os.getpid(), threading.Lock())

    def _send_request(self, message: str, topic: str) -> None:
        with self._send_lock():
            super()._send_request(message, topic)

    def _send_result(self, message: str, topic: str) -> None:
        with self._send_lock():
            super()._send_result(message, topic)


#: Client methods a thinker may call without blocking, and the task server may run as tasks.
TPM_CALLS = ("generate", "embed", "predict", "probe")


class TPMThinker(BaseThinker):
    """A Colmena thinker whose agents share one pool client, ``self.tpm``.

    ``url``/``token`` default to ``$TPMFLOW_URL``/``$TPMFLOW_TOKEN``. The client is closed, and
    calls still running are awaited, when the thinker's ``run`` ends.
    """

    def __init__(
        self,
        queues: ColmenaQueues,
        *,
        url: str | None = None,
        token: str | None = None,
        tpm_concurrency: int = 8,
        client_kwargs: dict[str, Any] | None = None,
        memory_batch: int = 32,
        memory_flush_s: float = 2.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(queues, **kwargs)
        self.memory_batch, self.memory_flush_s = memory_batch, memory_flush_s
        url = url or os.environ.get("TPMFLOW_URL")
        token = token or os.environ.get("TPMFLOW_TOKEN")
        if not url or not token:
            raise ValueError("TPMThinker needs the pool: pass url= and token=, or set TPMFLOW_URL and TPMFLOW_TOKEN")
        self.tpm = Client(url, token=token, **(client_kwargs or {}))
        # Calls run in these threads, so an agent that submits one never waits on the model.
        self._tpm_calls = ThreadPoolExecutor(tpm_concurrency, thread_name_prefix="tpm-call")
        # Several threads may deliver at once; a pipe must get whole messages.
        self._deliver_lock = threading.Lock()
        self._writers: dict[str, Writer] = {}  # knowledge collections this thinker records into
        self._writers_lock = threading.Lock()

    # -- campaign memory --------------------------------------------------------------------------

    def remember(self, collection: str, item: Any, metadata: dict[str, Any] | None = None) -> None:
        """Add ``item`` to the knowledge collection without waiting: a background ``Writer`` per
        collection batches the embed calls; per-item refusals collect in ``memory_errors``."""
        self._writer(collection).put(item, metadata)

    def remember_result(
        self,
        collection: str,
        result: Result,
        item: Callable[[Result], Any] | None = None,
        metadata: Callable[[Result], dict[str, Any]] | None = None,
    ) -> None:
        """Record a Colmena ``Result`` as it arrives (in a result processor): by default its first
        argument is the item and its value, method and task id the metadata (``result_pair``)."""
        self.remember(collection, *result_pair(result, item, metadata))

    def memory_errors(self) -> dict[str, list[Any]]:
        """Per collection, the items the pool refused so far (``AdapterInputError`` with their place)."""
        return {name: list(w.errors) for name, w in self._writers.items()}

    def _writer(self, collection: str) -> Writer:
        with self._writers_lock:
            if collection not in self._writers:
                self._writers[collection] = self.tpm.knowledge(collection).writer(
                    self.memory_batch, self.memory_flush_s
                )
            return self._writers[collection]

    def tpm_future(self, method: str, *args: Any, **kwargs: Any) -> Future[Any]:
        """``self.tpm.<method>(*args, **kwargs)`` in the background, as a future."""
        return self._tpm_calls.submit(_client_method(self.tpm, method), *args, **kwargs)

    def submit_tpm(
        self,
        method: str,
        *args: Any,
        topic: str = "tpm",
        task_info: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> str:
        """Call the pool without blocking; the answer reaches ``@result_processor(topic=topic)``.

        Returns the Colmena task id. The ``Result`` has ``method="tpm.<method>"``, the client's
        answer as ``value`` (or ``success=False`` and ``failure_info`` for a typed tpmflow error),
        and the usual timestamps. With Colmena's ``PipeQueues``, give TPM results a topic of their
        own (the default, ``"tpm"``): the task server writes the other topics' pipes.
        """
        call = _client_method(self.tpm, method)
        if topic not in self.queues.topics:
            raise ValueError(f"unknown topic {topic!r}; the queues know {sorted(self.queues.topics)}")
        result = Result(
            ((), {}),
            method=f"tpm.{method}",
            topic=topic,
            task_info=task_info or {},
            keep_inputs=False,
            serialization_method=self.queues.serialization_method,
            **_proxystore_fields(self.queues, topic),
        )
        result.mark_input_received()
        with self.queues._active_lock:  # counted like any task, so the thinker waits for it
            self.queues._active_tasks.add(result.task_id)
            self.queues._all_complete.clear()

        def run() -> None:
            result.mark_compute_started()
            started = time.perf_counter()
            try:
                value = _self_contained(call(*args, **kwargs))
                result.set_result(value, runtime=time.perf_counter() - started)
                result.mark_compute_ended()
                result.time.serialize_results, _ = result.serialize()
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the agent as a failed Result
                # (also one that cannot be serialised: an answer that never arrives would hang the thinker)
                result.value = None
                result.success = False
                result.failure_info = FailureInformation.from_exception(exc)
                result.time.running = time.perf_counter() - started
                result.mark_compute_ended()
                result.time.serialize_results, _ = result.serialize()
            result.mark_result_sent()
            with self._deliver_lock:
                self.queues._send_result(result.json(), topic=topic)

        self._tpm_calls.submit(run)
        return result.task_id

    def run(self) -> None:
        try:
            super().run()
        finally:
            self._tpm_calls.shutdown(wait=True)
            try:
                failures = []
                for writer in self._writers.values():  # what is still queued goes in before the client closes
                    try:
                        writer.close()
                    except Exception as exc:  # noqa: BLE001 - the other writers still close
                        failures.append(exc)
                for exc in failures:
                    self.logger.error(f"recording into the knowledge store failed: {exc!r}")
            finally:
                self.tpm.close()


def _self_contained(answer: Any) -> Any:
    """Arrays the pool answered by reference are read now, where the client reaches the store."""
    return answer.fetch() if isinstance(answer, Embeddings | Trace) else answer


def _client_method(client: Client, method: str) -> Callable[..., Any]:
    if method not in TPM_CALLS:
        raise ValueError(f"unknown pool call {method!r}; choose from {', '.join(TPM_CALLS)}")
    return getattr(client, method)  # type: ignore[no-any-return]


def _proxystore_fields(queues: ColmenaQueues, topic: str) -> dict[str, Any]:
    """The fields ``send_inputs`` sets, so a large TPM answer travels by proxy like a task's."""
    name, threshold = queues.proxystore_name.get(topic), queues.proxystore_threshold.get(topic)
    if name is None or threshold is None:
        return {}
    from proxystore.store import get_store

    store = get_store(name)
    assert store is not None, f"ProxyStore store {name!r} is not registered in this process"
    return {"proxystore_name": name, "proxystore_threshold": threshold, "proxystore_config": store.config()}


# -- the pool's calls as Colmena tasks ----------------------------------------------------------


def run_tpm_call(url: str, token: str, method: str, *args: Any, **kwargs: Any) -> Any:
    """Body of the ``tpm_*`` task methods, on a Parsl worker: one client call, proxies resolved."""
    from tpmflow.client import Client

    args = tuple(plain(a) for a in args)
    kwargs = {k: plain(v) for k, v in kwargs.items()}
    with Client(url, token=token) as client:
        return _self_contained(getattr(client, method)(*args, **kwargs))


def plain(value: Any) -> Any:
    """Resolve ProxyStore proxies (also inside lists and dicts) into the objects they stand for.

    The client then sends them as the pool's own payloads: bytes and large arrays by signed
    reference, small arrays inline. A proxy is never pickled towards the pool.
    """
    from proxystore.proxy import Proxy, extract

    if isinstance(value, Proxy):
        return extract(value)
    if isinstance(value, list | tuple):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def tpm_methods(
    url: str | None = None,
    token: str | None = None,
    *,
    calls: tuple[str, ...] = TPM_CALLS,
    executors: list[str] | str = "all",
) -> list[tuple[PythonMethod, dict[str, Any]]]:
    """Methods for ``ParslTaskServer``: ``tpm_generate``, ``tpm_embed``, ``tpm_predict``, ``tpm_probe``.

    Each takes the arguments of the client method of the same name. Put them on a light CPU
    executor: the work happens in the pool, the task only waits for it.
    """
    url = url or os.environ.get("TPMFLOW_URL")
    token = token or os.environ.get("TPMFLOW_TOKEN")
    if not url or not token:
        raise ValueError("tpm_methods needs the pool: pass url= and token=, or set TPMFLOW_URL and TPMFLOW_TOKEN")
    for call in calls:
        _client_method(Client.__new__(Client), call)  # an unknown name fails here, not on a worker
    return [
        (PythonMethod(functools.partial(run_tpm_call, url, token, call), name=f"tpm_{call}"), {"executors": executors})
        for call in calls
    ]


def split_site(path: str | Path, run_dir: str | None = None, layout: str | None = None) -> tuple[Any | None, Any]:
    """From one site file, (the pool's Parsl config, the task server's Parsl config).

    The first holds only the replicas' executor (``launcher.parsl_executor``): load it in the
    thinker's process before ``Pool.start``; it is ``None`` when the site's replicas are local
    processes. The second holds every other executor: give it to ``ParslTaskServer``, which
    loads it in its own process. ``layout``: one of the site's layouts (``load_site``).
    """
    from tpmflow.parsl.sites import build_parsl_config, load_site

    site = load_site(path, layout)
    if site.parsl is None:
        raise ValueError(f"{path}: the site has no parsl section to split")
    on_parsl = site.pool.launcher.kind == "parsl"
    replica_label = site.pool.launcher.parsl_executor if on_parsl else None
    pool_site = site.model_copy(deep=True)
    task_site = site.model_copy(deep=True)
    assert pool_site.parsl is not None and task_site.parsl is not None
    pool_site.parsl.executors = [e for e in site.parsl.executors if e.label == replica_label]
    task_site.parsl.executors = [e for e in site.parsl.executors if e.label != replica_label]
    if not task_site.parsl.executors:
        raise ValueError(f"{path}: the site has no executor for tasks besides the replicas' {replica_label!r}")
    pool_config = build_parsl_config(pool_site, run_dir=run_dir and f"{run_dir}/pool") if on_parsl else None
    return pool_config, build_parsl_config(task_site, run_dir=run_dir and f"{run_dir}/tasks")
