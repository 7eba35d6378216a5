"""Intermediary access through the pool: captures, interventions and the logit lens inside vLLM
agree with a transformers run of the same weights, per request, in shared batches."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tpmflow.errors import Forbidden, InvalidRequest
from tpmflow.schema import Add, Capture, LogitLens, Replace, Zero

PROMPT = "probe the residual stream"
LAYERS = 2  # the tiny model


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.fixture(scope="module")
def hf(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _hf_run(hf: Any, edit: Callable[[str, int, torch.Tensor], torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """Per-layer resid_post, attn_out, mlp_out (and logits) of a transformers run; ``edit`` may
    change a site's tensor like a plain PyTorch hook would."""
    model, tok = hf
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    seen: dict[str, np.ndarray] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):

        def out_hook(module: Any, args: Any, output: Any, i: int = i) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            if edit is not None:
                hidden = edit("hook_resid_post", i, hidden)
            seen[f"blocks.{i}.hook_resid_post"] = hidden[0].detach().numpy().copy()
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        def attn_hook(module: Any, args: Any, output: Any, i: int = i) -> Any:
            out = output[0]
            if edit is not None:
                out = edit("hook_attn_out", i, out)
            seen[f"blocks.{i}.hook_attn_out"] = out[0].detach().numpy().copy()
            return (out, *output[1:])

        def mlp_hook(module: Any, args: Any, output: Any, i: int = i) -> Any:
            if edit is not None:
                output = edit("hook_mlp_out", i, output)
            seen[f"blocks.{i}.hook_mlp_out"] = output[0].detach().numpy().copy()
            return output

        handles += [
            layer.register_forward_hook(out_hook),
            layer.self_attn.register_forward_hook(attn_hook),
            layer.mlp.register_forward_hook(mlp_hook),
        ]
    try:
        with torch.no_grad():
            seen["logits"] = model(ids).logits[0].numpy()
    finally:
        for h in handles:
            h.remove()
    return seen


ALL = [Capture(site=s) for s in ("hook_resid_post", "hook_attn_out", "hook_mlp_out", "hook_z", "hook_resid_pre")]


def test_captures_at_every_layer_equal_transformers(client: Any, hf: Any) -> None:
    trace = client.probe(PROMPT, capture=ALL, lens=LogitLens(top_k=3))
    ref = _hf_run(hf)
    for layer in range(LAYERS):
        for site in ("hook_resid_post", "hook_attn_out", "hook_mlp_out"):
            name = f"blocks.{layer}.{site}"
            assert _rel(trace[name], ref[name]) < 1e-4, name
    # resid_pre of block 0 is the token embeddings; of a later block, resid_post of the one before.
    model, tok = hf
    with torch.no_grad():
        embeddings = model.model.embed_tokens(torch.tensor(tok(PROMPT)["input_ids"])).numpy()
    assert _rel(trace["blocks.0.hook_resid_pre"], embeddings) < 1e-6
    # hook_z through o_proj is attn_out.
    np.testing.assert_allclose(trace["blocks.1.hook_resid_pre"], trace["blocks.0.hook_resid_post"], atol=1e-5)
    o_proj = hf[0].model.layers[1].self_attn.o_proj.weight.detach().numpy()
    z = trace["blocks.1.hook_z"]
    assert z.shape[1:] == (2, 64)
    assert _rel(z.reshape(len(z), -1) @ o_proj.T, trace["blocks.1.hook_attn_out"]) < 1e-4
    # The lens at the last layer is the model's own next-token distribution.
    last = trace.lens[-1]
    probs = torch.softmax(torch.from_numpy(ref["logits"]), dim=-1).numpy()
    for r, pos in enumerate(last["positions"]):
        top = np.argsort(-probs[pos])[:3]
        assert last["token_ids"][r] == top.tolist()
        np.testing.assert_allclose(last["probs"][r], probs[pos][top], atol=1e-4)
    assert trace.usage["activation_bytes"] > 0 and len(trace.top_tokens()) == LAYERS


@pytest.mark.parametrize("site", ["hook_resid_post", "hook_attn_out", "hook_mlp_out"])
def test_interventions_match_the_same_edit_in_transformers(client: Any, hf: Any, site: str) -> None:
    rng = np.random.default_rng(1)
    vector = rng.normal(size=128).astype(np.float32)
    patch = rng.normal(size=(2, 128)).astype(np.float32)
    cases: list[tuple[Any, Callable[[str, int, torch.Tensor], torch.Tensor]]] = []
    for layer in range(LAYERS):

        def add(s: str, i: int, t: torch.Tensor, layer: int = layer) -> torch.Tensor:
            return t + 0.5 * torch.from_numpy(vector) if (s, i) == (site, layer) else t

        def replace(s: str, i: int, t: torch.Tensor, layer: int = layer) -> torch.Tensor:
            if (s, i) != (site, layer):
                return t
            t = t.clone()
            t[0, [3, 1]] = torch.from_numpy(patch)  # rows follow the positions as given, unsorted
            return t

        def zero(s: str, i: int, t: torch.Tensor, layer: int = layer) -> torch.Tensor:
            return torch.zeros_like(t) if (s, i) == (site, layer) else t

        cases += [
            (Add(site=site, layer=layer, vector=vector, scale=0.5), add),
            (Replace(site=site, layer=layer, values=patch, positions=[3, 1]), replace),
            (Zero(site=site, layer=layer), zero),
        ]
    for spec, edit in cases:
        trace = client.probe(PROMPT, capture=[Capture(site="hook_resid_post")], interventions=[spec])
        ref = _hf_run(hf, edit)
        for layer in range(LAYERS):
            name = f"blocks.{layer}.hook_resid_post"
            assert _rel(trace[name], ref[name]) < 1e-4, (spec.op, spec.layer, name)
    plain = client.probe(PROMPT, capture=[Capture(site="hook_resid_post")])
    still = client.probe(
        PROMPT,
        capture=[Capture(site="hook_resid_post")],
        interventions=[Add(site=site, layer=0, vector=np.zeros(128, np.float32))],
    )
    assert np.array_equal(plain["blocks.1.hook_resid_post"], still["blocks.1.hook_resid_post"])


def test_probes_batched_together_each_get_what_they_get_alone(client: Any) -> None:
    """Eight probes with different steering vectors, sent at once with long generations so they share
    engine steps (each replica's step log says which did); each gets what it gets alone."""
    rng = np.random.default_rng(2)
    specs = [[Add(site="hook_resid_post", layer=0, vector=rng.normal(size=128).astype(np.float32))] for _ in range(8)]
    capture = [Capture(site="hook_resid_post", layers=[1])]
    alone = [client.probe(PROMPT, capture=capture, interventions=s) for s in specs]
    for _ in range(3):  # sharing a step is the scheduler's choice: a quiet, fast runner may serve them apart
        with ThreadPoolExecutor(8) as pool:
            together = list(
                pool.map(lambda s: client.probe(PROMPT, capture=capture, interventions=s, max_tokens=256), specs)
            )
        by_replica: dict[str, list[set[int]]] = {}
        for t in together:
            by_replica.setdefault(t.provenance["replica_id"], []).append(set(t.steps))
        shared = any(a & b for steps in by_replica.values() for k, a in enumerate(steps) for b in steps[k + 1 :])
        if shared:
            break
    assert shared, "no two probes on one replica shared an engine step"
    for a, t in zip(alone, together, strict=True):
        np.testing.assert_allclose(t["blocks.1.hook_resid_post"], a["blocks.1.hook_resid_post"], atol=1e-5)


def test_generated_steps_are_captured_when_asked(client: Any) -> None:
    trace = client.probe(PROMPT, capture=[Capture(site="blocks.1.hook_resid_post", generated=True)], max_tokens=4)
    n_prompt = len(trace.prompt_tokens)
    assert trace.positions["blocks.1.hook_resid_post"] == list(range(n_prompt + 3))  # the last token is never fed back


def test_bad_specs_are_refused_before_the_engine(client: Any) -> None:
    nan = np.full(128, np.nan, np.float32)
    bad = [
        ({"capture": [Capture(site="hook_resid_post", layers=[7])]}, "out of range"),
        ({"capture": [Capture(site="hook_nonsense")]}, "unknown site"),
        ({"interventions": [Add(site="hook_resid_post", layer=0, vector=np.ones(64, np.float32))]}, "hidden size"),
        ({"interventions": [Add(site="hook_resid_post", layer=0, vector=nan)]}, "finite"),
        ({"capture": [Capture(site="hook_mlp_out", positions=[0, 500])]}, "beyond the sequence"),
        ({"interventions": [Zero(site="hook_z", layer=0)]}, "hook_z"),
        ({"interventions": [Zero(site="hook_mlp_out")]}, "name the layer"),
        ({"interventions": [Add(site="blocks.0.hook_mlp_out", vector=np.full(128, 1e300))]}, "finite"),
        (
            {"interventions": [Replace(site="blocks.0.hook_mlp_out", values=np.ones((2, 128)), positions=[1, 1])]},
            "repeat",
        ),
        ({"capture": [Capture(site="blocks.0.hook_mlp_out", layers=[1])]}, "names its layer"),
    ]
    for kwargs, match in bad:
        with pytest.raises(InvalidRequest, match=match):
            client.probe(PROMPT, **kwargs)
    assert (
        client.probe("still up", capture=[Capture(site="blocks.0.hook_resid_post")])["blocks.0.hook_resid_post"].shape[
            1
        ]
        == 128
    )


def test_activation_byte_limit_and_probe_permission(pool: Any, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from tpmflow.client import Client

    with pytest.raises(InvalidRequest, match="would produce"):
        client.probe("x" * 900, capture=ALL, max_tokens=100)  # 5 sites x 2 layers x 900+ positions > 1 MiB
    prober = pool.add_principal("prober", permissions={"probe"})
    with Client(pool.url, token=prober) as c:
        trace = c.probe(PROMPT, capture=[Capture(site="blocks.0.hook_mlp_out")])
        pool.ledger.flush()
        (row,) = c.usage()
        assert row["activation_bytes"] == trace.usage["activation_bytes"] == trace["blocks.0.hook_mlp_out"].nbytes
    token = pool.add_principal("no-probe", permissions={"generate", "embed"})
    with Client(pool.url, token=token) as c, pytest.raises(Forbidden, match="probe"):
        c.probe(PROMPT, capture=[Capture(site="hook_resid_post")])


def test_big_captures_come_by_reference_written_by_the_worker(client: Any, pool: Any) -> None:
    trace = client.probe("y" * 700, capture=[Capture(site="blocks.1.hook_resid_post")])
    lazy = trace.captures["blocks.1.hook_resid_post"]
    assert lazy.reference is not None, "a 350 KB capture should not travel inline"
    assert pool.gateway.store.exists(lazy.reference)
    assert trace["blocks.1.hook_resid_post"].shape == (701, 128)


def test_async_probe_gives_the_same_trace(pool: Any, client: Any) -> None:
    import asyncio

    from tpmflow.client import AsyncClient

    vector = np.linspace(-1, 1, 128, dtype=np.float32)
    spec = dict(
        capture=[Capture(site="blocks.1.hook_resid_post")],
        interventions=[Add(site="blocks.0.hook_mlp_out", vector=vector)],
    )

    async def run() -> Any:
        async with AsyncClient(pool.url, token=pool.token, timeout=120) as ac:
            return await ac.probe(PROMPT, **spec)

    got = asyncio.run(run())
    np.testing.assert_allclose(
        got["blocks.1.hook_resid_post"], client.probe(PROMPT, **spec)["blocks.1.hook_resid_post"], atol=1e-6
    )


def test_serving_a_block_of_layers_on_your_own_activations(client: Any) -> None:
    """Replace at blocks.1.hook_resid_pre with activations from elsewhere + Capture at
    blocks.1.hook_resid_post runs layer 1 on them: here the activations of another prompt of the
    same length, whose own layer-1 output must come back."""
    other = "PROBE THE RESIDUAL STREAM"  # as many tokens as PROMPT
    source = client.probe(
        other, capture=[Capture(site="blocks.1.hook_resid_pre"), Capture(site="blocks.1.hook_resid_post")]
    )
    mine = source["blocks.1.hook_resid_pre"]
    served = client.probe(
        PROMPT,
        capture=[Capture(site="blocks.1.hook_resid_post")],
        interventions=[Replace(site="blocks.1.hook_resid_pre", values=mine, positions=list(range(len(mine))))],
    )
    assert _rel(served["blocks.1.hook_resid_post"], source["blocks.1.hook_resid_post"]) < 1e-4


def test_steering_at_resid_pre_of_block_0_matches_transformers(client: Any, hf: Any) -> None:
    """An edit of the embeddings themselves (residual still unset in vLLM's first layer)."""
    model, tok = hf
    vector = np.random.default_rng(5).normal(size=128).astype(np.float32)
    trace = client.probe(
        PROMPT,
        capture=[Capture(site="hook_resid_post")],
        interventions=[Add(site="blocks.0.hook_resid_pre", vector=vector)],
    )

    def pre(module: Any, args: Any, kwargs: Any) -> Any:
        if args:
            return (args[0] + torch.from_numpy(vector), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + torch.from_numpy(vector)}

    handle = model.model.layers[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        ref = _hf_run(hf)
    finally:
        handle.remove()
    for layer in range(LAYERS):
        name = f"blocks.{layer}.hook_resid_post"
        assert _rel(trace[name], ref[name]) < 1e-4, name
