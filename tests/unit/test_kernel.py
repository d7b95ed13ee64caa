"""The batched rank-r kernel against independent oracles.

1. A batch-1 loop that takes a REAL torch.optim.SGD step on a REAL peft model (float64) and measures the
   actual ΔW_m = s(B'A' − B0A0)/η from the weights before and after: each sample's summed projections
   (normalised and raw) must match the kernel run in fp32 on a padded batch, to ORACLE_ATOL.
2. torch.func per-sample gradients of the LoRA factors (float64): g_A, g_B match to FUNC_RTOL.
3. The r × r algebra for ⟨D, V⟩ and ‖D‖² against dense matrices.
4. Invariance: batch size, padding side, order, neighbours' prompt length change nothing (INVARIANCE_ATOL).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from sqsd_ray.data.records import Sample
from sqsd_ray.data.tokenize import collate, tokenize_sample
from sqsd_ray.models.directions import Direction, LoraFactors
from sqsd_ray.models.tiny import build_tiny_model, build_tiny_tokenizer
from sqsd_ray.scoring.hooks import LoraGradCapture
from sqsd_ray.scoring.kernel import ProjectionTarget, per_sample_lora_grads, update_inner, update_norm_sq
from sqsd_ray.scoring.scorer import InitState, ScoringPass, SqsdScorer, per_sample_mean_nll
from tests.conftest import FUNC_RTOL, INVARIANCE_ATOL, ORACLE_ATOL

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8.0
SCALING = ALPHA / RANK
CONVERSATIONS = [
    ("Name three primary colours.", "Red, yellow and blue."),
    ("What is 2+2?", "4"),
    ("Write a haiku about autumn leaves falling in a quiet forest.", "Leaves drift slowly down\nthe forest holds its breath\nquiet gold settles"),
    ("x", "A longer answer that goes on for a while so that this sample is the longest one in the batch."),
]


def _modules(model) -> list[str]:
    return [n for n, _ in model.named_modules() if n.split(".")[-1] in TARGETS]


def _random_factors(model, rank, seed, std=0.1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in _modules(model):
        lin = model.get_submodule(name)
        A = torch.randn(rank, lin.in_features, generator=gen, dtype=dtype) * std
        B = torch.randn(lin.out_features, rank, generator=gen, dtype=dtype) * std
        out[name] = (A, B)
    return out


def _direction(model, seed, scaling=2.0) -> Direction:
    factors = _random_factors(model, RANK, seed)
    return Direction(modules={m: LoraFactors(A=A, B=B, scaling=scaling) for m, (A, B) in factors.items()}, metadata={})


def _set_factors(peft_model, factors, adapter):
    for name, (A, B) in factors.items():
        layer = peft_model.base_model.model.get_submodule(name)
        with torch.no_grad():
            layer.lora_A[adapter].weight.copy_(A)
            layer.lora_B[adapter].weight.copy_(B)


def _tokenized(tokenizer, conversations=CONVERSATIONS):
    return [
        tokenize_sample(Sample(sample_id=f"s{i}", messages=({"role": "user", "content": p},), response=r, source="test"),
                        tokenizer, max_length=512)
        for i, (p, r) in enumerate(conversations)
    ]


def _scorer(base, states, directions, dtype=torch.float32, reduction=None):
    """Peft model with one adapter per init state; danger projected at states['danger'], safety at states['safety']."""
    model = copy.deepcopy(base).to(dtype)
    peft_model = None
    passes = []
    for d_name, factors in states.items():
        adapter = f"{d_name}_state"
        cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=adapter)
        else:
            peft_model.add_adapter(adapter, cfg)
        _set_factors(peft_model, factors, adapter)
        passes.append(ScoringPass(InitState(adapter, factors, SCALING), {d_name: directions[d_name]}))
    peft_model.eval()
    return SqsdScorer(peft_model, passes, reduction=reduction)


def _oracle_projections(base, factors, direction, ids, labels, eta=1e-7):
    """Batch-1: real SGD step on a float64 peft model; actual ΔW from the weights (paper Eq. 9-11)."""
    peft_model = get_peft_model(copy.deepcopy(base).double(),
                                LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    _set_factors(peft_model, factors, "default")
    peft_model.eval()
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=eta)
    layers = {m: peft_model.base_model.model.get_submodule(m) for m in factors}
    before = {m: (l.lora_A["default"].weight.detach().clone(), l.lora_B["default"].weight.detach().clone())
              for m, l in layers.items()}
    loss = peft_model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    loss.backward()
    opt.step()
    normed = raw = 0.0
    for m, layer in layers.items():
        A1, B1 = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        delta_w = SCALING * (B1 @ A1 - before[m][1] @ before[m][0]) / eta
        f = direction.modules[m]
        v = f.scaling * f.B.double() @ f.A.double()
        normed += float((delta_w * v).sum() / (delta_w.norm() * v.norm()))
        raw += float((delta_w * v).sum() / v.norm())
    return float(loss.detach()), normed, raw


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_projections_match_real_sgd_step(arch):
    tokenizer = build_tiny_tokenizer()
    base = build_tiny_model(arch, seed=0, dtype=torch.float64)
    states = {"danger": _random_factors(base, RANK, seed=1), "safety": _random_factors(base, RANK, seed=2)}
    directions = {"danger": _direction(base, 3), "safety": _direction(base, 4)}
    tokenized = _tokenized(tokenizer)
    scorer = _scorer(base, states, directions)
    out = scorer.score_batch(collate(tokenized, tokenizer.pad_token_id))
    for i, t in enumerate(tokenized):
        for d_name in ("danger", "safety"):
            loss, normed, raw = _oracle_projections(base, states[d_name], directions[d_name], t.input_ids, t.labels)
            assert out[f"{d_name}_proj"][i] == pytest.approx(normed, abs=ORACLE_ATOL)
            assert out[f"{d_name}_proj_raw"][i] == pytest.approx(raw, abs=ORACLE_ATOL, rel=1e-4)
            assert out[f"loss_{d_name}_state"][i] == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(out["sqsd"], out["danger_proj"] - out["safety_proj"])
    assert (out["status"] == "ok").all()
    # the oracle must be able to fail: a different state gives a different answer
    _, other, _ = _oracle_projections(base, states["safety"], directions["danger"], tokenized[0].input_ids, tokenized[0].labels)
    assert abs(other - out["danger_proj"][0]) > 10 * ORACLE_ATOL


def _captured_grads(peft_model, adapter, batch, B0s):
    grads = {}

    def on_grad(name, x, a, gu):
        grads[name] = per_sample_lora_grads(x, a, gu, B0s[name], batch["attention_mask"].bool())

    with LoraGradCapture(peft_model, adapter, on_grad):
        logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_sample_mean_nll(logits, batch["labels"])[0].sum().backward()
    return grads


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_per_sample_grads_match_torch_func(arch):
    from torch.func import functional_call, grad

    tokenizer = build_tiny_tokenizer()
    base = build_tiny_model(arch, seed=0, dtype=torch.float64)
    factors = _random_factors(base, RANK, seed=5)
    peft_model = get_peft_model(copy.deepcopy(base),
                                LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    _set_factors(peft_model, factors, "default")
    peft_model.eval()
    tokenized = _tokenized(tokenizer)
    batch = collate(tokenized, tokenizer.pad_token_id)
    grads = _captured_grads(peft_model, "default", batch, {m: B for m, (A, B) in factors.items()})

    lora_params = {n: p.detach() for n, p in peft_model.named_parameters() if "lora_" in n}

    def sample_loss(params, ids, labels):
        logits = functional_call(peft_model, params, (ids[None],)).logits
        return per_sample_mean_nll(logits, labels[None])[0].sum()

    for i, t in enumerate(tokenized):
        g = grad(sample_loss)(lora_params, torch.tensor(t.input_ids), torch.tensor(t.labels))
        for m in factors:
            prefix = f"base_model.model.{m}"
            g_A_ref = g[f"{prefix}.lora_A.default.weight"]
            g_B_ref = g[f"{prefix}.lora_B.default.weight"]
            g_A, g_B = grads[m]
            torch.testing.assert_close(g_A[i], g_A_ref, rtol=FUNC_RTOL, atol=1e-12)
            torch.testing.assert_close(g_B[i], g_B_ref, rtol=FUNC_RTOL, atol=1e-12)


def test_rank_r_algebra_matches_dense():
    gen = torch.Generator().manual_seed(0)
    n, r, d_in, d_out, r_v = 3, 4, 12, 10, 2
    g_A = torch.randn(n, r, d_in, generator=gen, dtype=torch.float64)
    g_B = torch.randn(n, d_out, r, generator=gen, dtype=torch.float64)
    A0 = torch.randn(r, d_in, generator=gen, dtype=torch.float64)
    B0 = torch.randn(d_out, r, generator=gen, dtype=torch.float64)
    A_v = torch.randn(r_v, d_in, generator=gen, dtype=torch.float64)
    B_v = torch.randn(d_out, r_v, generator=gen, dtype=torch.float64)
    s_v = 1.7
    dense_d = B0 @ g_A + g_B @ A0  # (n, d_out, d_in)
    dense_v = s_v * B_v @ A_v
    target = ProjectionTarget.build(A0, B0, A_v, B_v, s_v, dtype=torch.float64)
    torch.testing.assert_close(update_inner(g_A, g_B, target), (dense_d * dense_v).sum((1, 2)))
    torch.testing.assert_close(update_norm_sq(g_A, g_B, A0, B0), (dense_d**2).sum((1, 2)))
    assert target.v_norm == pytest.approx(float(dense_v.norm()))


@pytest.fixture(scope="module")
def invariance_setup():
    tokenizer = build_tiny_tokenizer()
    base = build_tiny_model("qwen3", seed=0)
    states = {"danger": _random_factors(base, RANK, seed=1, dtype=torch.float32),
              "safety": _random_factors(base, RANK, seed=2, dtype=torch.float32)}
    directions = {"danger": _direction(base, 3), "safety": _direction(base, 4)}
    scorer = _scorer(base, states, directions)
    return tokenizer, scorer


def _score_by_id(scorer, tokenized, pad_id, batch_size, padding_side="right"):
    scores = {}
    for start in range(0, len(tokenized), batch_size):
        out = scorer.score_batch(collate(tokenized[start:start + batch_size], pad_id, padding_side=padding_side))
        for i, sid in enumerate(out["sample_id"]):
            scores[sid] = np.array([out[k][i] for k in ("sqsd", "sqsd_raw", "danger_proj", "safety_proj", "loss_danger_state")])
    return scores


def test_scores_invariant_to_batching_padding_order_and_neighbours(invariance_setup):
    tokenizer, scorer = invariance_setup
    tokenized = _tokenized(tokenizer)
    pad = tokenizer.pad_token_id
    reference = _score_by_id(scorer, tokenized, pad, batch_size=1)
    variants = {
        "batch of 4": _score_by_id(scorer, tokenized, pad, batch_size=4),
        "batch of 2": _score_by_id(scorer, tokenized, pad, batch_size=2),
        "left padding": _score_by_id(scorer, tokenized, pad, batch_size=4, padding_side="left"),
        "reversed order": _score_by_id(scorer, tokenized[::-1], pad, batch_size=3),
    }
    # neighbours with much longer prompts: the same samples next to long-prompt fillers
    fillers = _tokenized(tokenizer, [("long prompt " * 25, "ok"), ("another long prompt " * 15, "fine")])
    fillers = [type(f)(**{**f.__dict__, "sample_id": f"filler{i}"}) for i, f in enumerate(fillers)]
    mixed = _score_by_id(scorer, [fillers[0], tokenized[0], fillers[1], tokenized[1], tokenized[2], tokenized[3]], pad, 6)
    variants["long-prompt neighbours"] = mixed
    for label, scores in variants.items():
        for sid, ref in reference.items():
            np.testing.assert_allclose(scores[sid], ref, atol=INVARIANCE_ATOL, rtol=1e-5, err_msg=f"{label}: {sid}")


def test_zero_update_is_flagged_not_scored():
    """A sample with no response token gives ΔW = 0 in every module: status says so and scores are NaN."""
    tokenizer = build_tiny_tokenizer()
    base = build_tiny_model("llama", seed=0)
    states = {"danger": _random_factors(base, RANK, 1, dtype=torch.float32),
              "safety": _random_factors(base, RANK, 2, dtype=torch.float32)}
    scorer = _scorer(base, states, {"danger": _direction(base, 3), "safety": _direction(base, 4)})
    t = _tokenized(tokenizer)[:2]
    t[1] = type(t[1])(**{**t[1].__dict__, "labels": [-100] * len(t[1].labels)})
    out = scorer.score_batch(collate(t, tokenizer.pad_token_id))
    assert list(out["status"]) == ["ok", "zero_update"]
    assert np.isfinite(out["sqsd"][0]) and np.isnan(out["sqsd"][1])
    assert out["zero_norm_modules"][1] == 2 * len(scorer.modules)
