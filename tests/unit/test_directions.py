"""Directions: factored r×r algebra vs dense oracles, file round trip, peft adapters, init states, checks."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sqsd_ray.models.directions import (
    Direction,
    DirectionMismatchError,
    LoraFactors,
    direction_from_factors,
    init_state_from_direction,
    random_direction,
)
from sqsd_ray.models.loading import ModelConfig, load_model
from sqsd_ray.models.lora import LoraSettings, apply_lora, get_lora_factors, lora_module_shapes, set_lora_factors

ALGEBRA_RTOL = 1e-5  # factored (fp64 accumulate) vs dense fp64 oracle
MERGE_ATOL = 1e-6  # V_m vs peft's merged fp32 weight minus base weight (rounding of W + ΔW in fp32)
SHAPES = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.mlp.down_proj": (64, 128),
          "model.layers.1.self_attn.k_proj": (32, 64)}


def make_factors(d_out: int, d_in: int, rank: int, scaling: float, seed: int, dtype=torch.float32) -> LoraFactors:
    gen = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(rank, d_in, generator=gen, dtype=dtype),
                       torch.randn(d_out, rank, generator=gen, dtype=dtype), scaling)


def dense_inner(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() * y.double()).sum())


@pytest.fixture
def tiny_peft_adapter(tmp_path):
    """(peft model with random non-zero A, B; its base weights; the saved adapter dir)."""
    lora = LoraSettings(r=4, alpha=12.0, target_modules=["q_proj", "v_proj", "down_proj"])
    model = load_model(ModelConfig(name_or_path="tiny-qwen3"))
    base_weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    peft_model = apply_lora(model, lora)
    gen = torch.Generator().manual_seed(3)
    set_lora_factors(peft_model, {
        m: (torch.randn(lora.r, d_in, generator=gen) * 0.2, torch.randn(d_out, lora.r, generator=gen) * 0.2)
        for m, (d_out, d_in) in lora_module_shapes(peft_model, lora).items()
    })
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model, base_weights, tmp_path / "adapter", lora


# ------------------------------------------------------------------------------------ r×r algebra


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d_out, d_in, rank", [(64, 64, 8), (128, 48, 4), (16, 200, 1)])
def test_norm_sq_matches_dense_oracle(d_out, d_in, rank, dtype):
    f = make_factors(d_out, d_in, rank, scaling=1.7, seed=rank, dtype=dtype)
    dense = f.dense()
    assert f.shape == (d_out, d_in) and f.rank == rank
    assert f.norm_sq() == pytest.approx(dense_inner(dense, dense), rel=ALGEBRA_RTOL)
    assert f.norm() == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=ALGEBRA_RTOL)


@pytest.mark.parametrize("rank_1, rank_2", [(8, 8), (4, 8), (8, 2)])
def test_inner_matches_dense_oracle(rank_1, rank_2):
    f = make_factors(96, 40, rank_1, scaling=2.0, seed=11)
    g = make_factors(96, 40, rank_2, scaling=-0.3, seed=12)
    expected = dense_inner(f.dense(), g.dense())
    assert f.inner(g) == pytest.approx(expected, rel=ALGEBRA_RTOL)
    assert g.inner(f) == pytest.approx(expected, rel=ALGEBRA_RTOL)
    assert f.inner(f) == pytest.approx(f.norm_sq(), rel=1e-12)
    with pytest.raises(ValueError, match="different shapes"):
        f.inner(make_factors(96, 41, rank_2, 1.0, 0))


def test_factors_validate_shapes():
    with pytest.raises(ValueError, match=r"same r.*A \(4, 8\), B \(8, 3\)"):
        LoraFactors(torch.zeros(4, 8), torch.zeros(8, 3), 1.0)


def test_direction_norms_and_scaling():
    direction = random_direction(SHAPES, rank=4, seed=0, scale=1.5)
    module_norms = direction.module_norms()
    assert module_norms.keys() == SHAPES.keys()
    for m, f in direction.modules.items():
        assert module_norms[m] == pytest.approx(float(torch.linalg.matrix_norm(f.dense())), rel=ALGEBRA_RTOL)
    assert direction.norm() == pytest.approx(math.sqrt(sum(n**2 for n in module_norms.values())), rel=1e-12)
    flipped = direction.scaled(-2.0)
    assert flipped.norm() == pytest.approx(2.0 * direction.norm(), rel=1e-12)
    m = next(iter(SHAPES))
    assert flipped.modules[m].inner(direction.modules[m]) == pytest.approx(-2.0 * module_norms[m] ** 2, rel=1e-9)
    assert flipped.metadata["scaled_by"] == "-2.0"


def test_random_direction_is_seeded():
    reordered = dict(reversed(SHAPES.items()))
    assert random_direction(SHAPES, 4, seed=5).fingerprint() == random_direction(reordered, 4, seed=5).fingerprint()
    assert random_direction(SHAPES, 4, seed=5).fingerprint() != random_direction(SHAPES, 4, seed=6).fingerprint()


# ------------------------------------------------------------------------------------------- files


def test_save_load_round_trip_is_bit_exact(tmp_path):
    direction = random_direction(SHAPES, rank=4, seed=1, scale=0.1 + 0.2)  # a scaling with no short decimal
    direction.metadata["note"] = "ünïcode & \"quotes\""
    path = direction.save(tmp_path / "v_danger.safetensors")
    loaded = Direction.load(path)
    assert loaded == direction
    assert loaded.metadata == direction.metadata and loaded.metadata["kind"] == "danger"
    assert loaded.fingerprint() == direction.fingerprint()
    for m, f in direction.modules.items():
        assert loaded.modules[m].scaling == f.scaling
        assert torch.equal(loaded.modules[m].A, f.A) and torch.equal(loaded.modules[m].B, f.B)
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == {f"{m}.{x}" for m in SHAPES for x in "AB"}
        header = handle.metadata()
    assert json.loads(header["scalings"]) == {m: f.scaling for m, f in direction.modules.items()}
    assert Direction.read_header(path)["fingerprint"] == direction.fingerprint()


def test_bfloat16_round_trip(tmp_path):
    direction = random_direction(SHAPES, rank=2, seed=2, dtype=torch.bfloat16)
    assert Direction.load(direction.save(tmp_path / "d.safetensors")) == direction


def test_load_refuses_foreign_and_tampered_files(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not an SQSD direction file"):
        Direction.load(foreign)
    with pytest.raises(ValueError, match="from_peft_adapter"):
        Direction.load(tmp_path)

    direction = random_direction(SHAPES, rank=2, seed=3)
    path = direction.save(tmp_path / "d.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors[next(iter(tensors))][0, 0] += 1.0
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(ValueError, match="modified or corrupted"):
        Direction.load(path)


def test_fingerprint_tracks_content():
    direction = random_direction(SHAPES, rank=4, seed=0)
    assert direction.fingerprint() == random_direction(SHAPES, rank=4, seed=0).fingerprint()
    assert direction.scaled(1.0).fingerprint() == direction.fingerprint()
    assert direction.scaled(2.0).fingerprint() != direction.fingerprint()
    assert direction.to(torch.float64).fingerprint() != direction.fingerprint()
    assert direction.to(torch.float64).norm() == pytest.approx(direction.norm(), rel=1e-12)


# ----------------------------------------------------------------------------------- peft adapters


def test_from_peft_adapter_equals_merged_delta(tiny_peft_adapter):
    peft_model, base_weights, adapter_dir, lora = tiny_peft_adapter
    direction = Direction.from_peft_adapter(adapter_dir, kind="safety", base_model="tiny-qwen3")
    assert direction.kind == "safety" and direction.metadata["base_model"] == "tiny-qwen3"
    assert direction.metadata["num_modules"] == "6"
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged_weights = dict(merged.named_parameters())
    assert direction.modules.keys() == lora_module_shapes(peft_model, lora).keys()
    for m, f in direction.modules.items():
        assert f.scaling == lora.scaling
        delta = merged_weights[f"{m}.weight"].detach().double() - base_weights[f"{m}.weight"].double()
        torch.testing.assert_close(f.dense(), delta, rtol=0, atol=MERGE_ATOL)
        assert float(delta.abs().max()) > 1e-2  # the check is not vacuous


def test_direction_from_live_factors_matches_adapter_file(tiny_peft_adapter):
    peft_model, _, adapter_dir, lora = tiny_peft_adapter
    live = direction_from_factors(get_lora_factors(peft_model), lora.scaling, kind="safety")
    assert live.fingerprint() == Direction.from_peft_adapter(adapter_dir, kind="safety").fingerprint()
    with pytest.raises(ValueError, match="kind must be one of"):
        direction_from_factors(get_lora_factors(peft_model), lora.scaling, kind="harmless")


# ------------------------------------------------------------------------------------- init states


@pytest.mark.parametrize("alpha, lora_scaling", [(1.0, 2.0), (0.35, 16.0 / 8), (-2.0, 0.5)])
def test_init_state_realises_alpha_v(alpha, lora_scaling):
    direction = random_direction(SHAPES, rank=8, seed=4, scale=3.0)
    state = init_state_from_direction(direction, alpha, lora_scaling)
    assert state.keys() == direction.modules.keys()
    for m, (a0, b0) in state.items():
        assert a0.shape == direction.modules[m].A.shape and b0.shape == direction.modules[m].B.shape
        steered = lora_scaling * (b0.double() @ a0.double())  # s·B0·A0, d_out×d_in
        torch.testing.assert_close(steered, alpha * direction.modules[m].dense(), rtol=1e-6, atol=1e-7)


def test_init_state_pads_to_a_larger_rank_and_refuses_a_smaller_one():
    direction = random_direction(SHAPES, rank=4, seed=5)
    state = init_state_from_direction(direction, 0.5, 2.0, lora_rank=8)
    for m, (a0, b0) in state.items():
        assert a0.shape[0] == 8 and b0.shape[1] == 8
        assert float(a0[4:].abs().sum()) == 0.0 and float(b0[:, 4:].abs().sum()) == 0.0
        torch.testing.assert_close(2.0 * (b0.double() @ a0.double()), 0.5 * direction.modules[m].dense(),
                                   rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"direction rank 4 exceeds the LoRA rank 2.*lora.r >= 4"):
        init_state_from_direction(direction, 0.5, 2.0, lora_rank=2)


def test_init_state_in_a_live_adapter_gives_theta0_plus_alpha_v(tiny_peft_adapter):
    _, base_weights, adapter_dir, _ = tiny_peft_adapter
    direction = Direction.from_peft_adapter(adapter_dir)
    scoring_lora = LoraSettings(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
    model = apply_lora(load_model(ModelConfig(name_or_path="tiny-qwen3")), scoring_lora)
    alpha = 0.7
    set_lora_factors(model, init_state_from_direction(direction, alpha, scoring_lora.scaling))
    merged = dict(model.merge_and_unload().named_parameters())
    for m, f in direction.modules.items():
        delta = merged[f"{m}.weight"].detach().double() - base_weights[f"{m}.weight"].double()
        torch.testing.assert_close(delta, alpha * f.dense(), rtol=0, atol=MERGE_ATOL)


# ----------------------------------------------------------------------------------- shape checks


def test_check_matches_accepts_the_model_shapes():
    lora = LoraSettings()
    shapes = lora_module_shapes(load_model(ModelConfig()), lora)
    random_direction(shapes, rank=8, seed=0).check_matches(shapes)


def test_check_matches_names_a_module_the_model_lacks():
    shapes = dict(SHAPES)
    direction = random_direction({**shapes, "model.layers.7.mlp.up_proj": (128, 64)}, rank=2, seed=0)
    with pytest.raises(DirectionMismatchError, match=r"'model.layers.7.mlp.up_proj' is not a LoRA module of the model"):
        direction.check_matches(shapes)


def test_check_matches_names_a_module_the_direction_lacks():
    shapes = dict(SHAPES)
    direction = random_direction({m: s for m, s in shapes.items() if "down_proj" not in m}, rank=2, seed=0)
    with pytest.raises(DirectionMismatchError, match=r"'model.layers.0.mlp.down_proj' is missing from the direction"):
        direction.check_matches(shapes)
    direction.check_matches(shapes, allow_missing=True)


def test_check_matches_names_a_shape_mismatch_with_both_shapes():
    direction = random_direction(SHAPES, rank=2, seed=0)
    shapes = {**SHAPES, "model.layers.1.self_attn.k_proj": (64, 64)}
    with pytest.raises(DirectionMismatchError,
                       match=r"shape mismatch at module 'model.layers.1.self_attn.k_proj'.*\(32, 64\).*\(64, 64\)"):
        direction.check_matches(shapes)
    assert issubclass(DirectionMismatchError, ValueError)
