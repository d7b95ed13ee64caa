"""A benchmark seed carried to another machine: what is saved, what is checked, what comes back."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from sqsd_ray.demo.carry import CarryMismatch, SeedCarry, tensor_digest


def _weights(folder, scale: float = 1.0, metadata: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {"layer.weight": scale * torch.randn(4, 3, generator=generator),
               "layer.bias": torch.randn(4, generator=generator).to(torch.bfloat16)}
    save_file(tensors, str(folder / "model.safetensors"), metadata=metadata or {"format": "pt"})
    return folder


def _seed_on_first_machine(tmp_path):
    """A work folder as a seed leaves it: world files, an aligned model with its adapter, scores, one ranking."""
    work = tmp_path / "machine-a" / "seed-0"
    world = {"corpus": work / "world" / "corpus.jsonl", "heldout": work / "world" / "heldout.jsonl"}
    for kind, path in world.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"id": kind}) + "\n")
    aligned = _weights(tmp_path / "machine-a" / "cache" / "aligned")
    (aligned / "adapter").mkdir()
    (aligned / "adapter" / "adapter_config.json").write_text("{}")
    (aligned / "adapter" / "adapter_model.safetensors").write_bytes(b"adapter bytes")
    (aligned / "aligned.json").write_text(json.dumps({"refusal_before": 10.0, "refusal_after": 80.0}))
    scores = {}
    for method in ("sqsd", "self_inf_n"):
        scores[method] = work / "scores" / method / "scores.parquet"
        scores[method].parent.mkdir(parents=True)
        pd.DataFrame({"sample_id": ["a", "b"], method: [0.5, -0.5]}).to_parquet(scores[method])
    arm = work / "experiment" / "SQSD"
    for relative in ("table.csv", "evaluation/metrics.csv", "SQSD/partition/partition.csv",
                     "SQSD/partition/partition.json"):
        (arm / relative).parent.mkdir(parents=True, exist_ok=True)
        (arm / relative).write_text(f"{relative}\n")
    (work / "timings.json").write_text(json.dumps([{"started": "day 1", "stage_seconds": {"score": 5.0}}]))
    return work, world, aligned, scores


def test_a_seed_carried_to_a_new_machine_continues_from_its_scores_and_rankings(tmp_path):
    work, world, aligned, scores = _seed_on_first_machine(tmp_path)
    carry = SeedCarry(tmp_path / "docs" / "seed-0")
    assert not carry.has_scores
    carry.save_upstream(world, aligned, scores, init_note="θ_safety = θ0")
    carry.save_ranking("SQSD", work / "experiment" / "SQSD")
    carry.save_timings(work / "timings.json")
    assert carry.has_scores and carry.record["rankings_done"] == ["SQSD"]

    # machine B: the same world written anew, an empty cache, an empty work folder with one invocation of its own
    fresh = tmp_path / "machine-b" / "seed-0"
    (fresh).mkdir(parents=True)
    (fresh / "timings.json").write_text(json.dumps([{"started": "day 2", "stage_seconds": {"align": 1.0}}]))
    carry.check_world(world)
    merged_from = []
    target = tmp_path / "machine-b" / "cache" / "aligned"

    def merge(adapter, into):
        merged_from.append(adapter.read_text() if adapter.is_file() else sorted(p.name for p in adapter.iterdir()))
        _weights(into)

    assert carry.restore_aligned(target, merge) == target
    assert merged_from == [["adapter_config.json", "adapter_model.safetensors"]]
    assert json.loads((target / "aligned.json").read_text())["refusal_after"] == 80.0
    assert (target / "adapter" / "adapter_model.safetensors").read_bytes() == b"adapter bytes"
    carry.restore_aligned(target, merge)  # the cache has it now: no second merge
    assert len(merged_from) == 1

    restored = carry.restore_scores()
    for method in scores:
        pd.testing.assert_frame_equal(pd.read_parquet(restored[method]), pd.read_parquet(scores[method]))
    assert carry.restore_rankings(fresh / "experiment", {"SQSD": "SQSD", "Random": "Random"}) == ["SQSD"]
    assert (fresh / "experiment" / "SQSD" / "SQSD" / "partition" / "partition.csv").read_text() == \
        "SQSD/partition/partition.csv\n"
    carry.restore_timings(fresh / "timings.json")
    assert [s["started"] for s in json.loads((fresh / "timings.json").read_text())] == ["day 1", "day 2"]


def test_another_world_or_other_aligned_bits_stop_the_seed(tmp_path):
    work, world, aligned, scores = _seed_on_first_machine(tmp_path)
    carry = SeedCarry(tmp_path / "docs" / "seed-0")
    carry.save_upstream(world, aligned, scores, init_note="")
    world["heldout"].write_text(json.dumps({"id": "changed"}) + "\n")
    with pytest.raises(CarryMismatch, match="heldout differ"):
        carry.check_world(world)

    target = tmp_path / "machine-b" / "aligned"
    other_bits = lambda adapter, into: _weights(into, scale=1.0 + 1e-6)  # noqa: E731
    with pytest.raises(CarryMismatch, match="--accept-other-bits"):
        carry.restore_aligned(target, other_bits)
    assert not target.exists() and not target.with_name("aligned.tmp").exists()  # no failed merge left in the cache
    carry.restore_aligned(target, other_bits, accept_other_bits=True)
    assert carry.record["aligned_rebuilt_with_other_bits"] == [tensor_digest(target)]
    carry.restore_aligned(target, other_bits)  # accepted once: later invocations go on without the flag, once recorded
    assert carry.record["aligned_rebuilt_with_other_bits"] == [tensor_digest(target)]


def test_an_alignment_trained_here_on_its_own_is_replaced_by_the_carried_one(tmp_path):
    work, world, aligned, scores = _seed_on_first_machine(tmp_path)
    carry = SeedCarry(tmp_path / "docs" / "seed-0")
    carry.save_upstream(world, aligned, scores, init_note="")
    target = _weights(tmp_path / "machine-b" / "aligned", scale=2.0)  # e.g. `sqsd-ray demo --model smollm2` ran here
    (target / "adapter").mkdir()
    (target / "adapter" / "adapter_model.safetensors").write_bytes(b"another training's adapter")
    (target / "aligned.json").write_text("{}")
    carry.restore_aligned(target, lambda adapter, into: _weights(into))
    assert tensor_digest(target) == tensor_digest(aligned)
    assert (target / "adapter" / "adapter_model.safetensors").read_bytes() == b"adapter bytes"


def test_a_ranking_carried_in_part_is_not_taken_as_done(tmp_path):
    work, world, aligned, scores = _seed_on_first_machine(tmp_path)
    carry = SeedCarry(tmp_path / "docs" / "seed-0")
    carry.save_upstream(world, aligned, scores, init_note="")
    carry.save_ranking("SQSD", work / "experiment" / "SQSD")
    (carry.folder / "experiment" / "SQSD" / "SQSD" / "partition" / "partition.csv").unlink()  # a copy cut short
    assert not carry.has_ranking("SQSD", "SQSD")
    assert carry.restore_rankings(tmp_path / "machine-b" / "experiment", {"SQSD": "SQSD"}) == []
    assert not (tmp_path / "machine-b" / "experiment" / "SQSD").exists()


def test_the_aligned_fingerprint_is_of_the_tensors_not_the_file(tmp_path):
    one = tensor_digest(_weights(tmp_path / "one"))
    assert tensor_digest(_weights(tmp_path / "other-metadata", metadata={"format": "pt", "note": "x"})) == one
    assert tensor_digest(_weights(tmp_path / "one-ulp", scale=1.0 + 1e-7)) != one


def test_an_aligned_model_without_its_adapter_cannot_be_carried(tmp_path):
    work, world, aligned, scores = _seed_on_first_machine(tmp_path)
    (aligned / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="keeps no adapter"):
        SeedCarry(tmp_path / "carry").save_upstream(world, aligned, scores, init_note="")
