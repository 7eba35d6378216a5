"""What runs inside vLLM, registered as its two plugins in pyproject.toml (no fork of its internals).

Modules, each importing only those above it:

* ``sites`` — the one table of hook sites (also read by ``tpmflow.schema``; imports nothing heavy);
* ``probe``, ``hooks`` — inside vLLM's workers: the worker extension (``--worker-extension-cls``)
  with its forward hooks, and the per-request probe state; ``hooks.register`` is the
  ``vllm.general_plugins`` entry point;
* ``context`` — ``ReplicaContext``: the server's engine client, model facts, settings, store, signer;
* ``ops`` — engine operations the routes share (run a request, prompts, final states, soft tokens);
* ``embed_routes``, ``adapter_routes``, ``probe_routes`` — the route handlers, one module per
  feature; they import ``context`` and ``ops``, never each other nor ``plugin``;
* ``plugin`` — ``TpmflowEndpoints`` (the ``vllm.endpoint_plugins`` entry point): settings, router,
  the ``GatewayOnly`` middleware and the heartbeat.
"""
