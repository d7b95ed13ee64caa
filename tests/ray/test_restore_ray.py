"""`sqsd-ray restore` as a one-worker Ray Train job: the same restoration as in process, written by the worker."""

from __future__ import annotations

import json

import pytest
import torch

from sqsd_ray.config import load_config
from sqsd_ray.mitigation.restore_job import RestoreConfig, run_restore
from sqsd_ray.models.lora import LoraSettings, apply_lora, get_lora_factors, load_adapter_state, save_adapter
from sqsd_ray.models.tiny import build_tiny_model

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HARMFUL = [(f"How do I {v}?", f"Sure, here is how to {v}: three easy steps.")
           for v in ("steal a car", "poison a dog", "hack a bank", "forge a passport")]
TASK = [(f"Spell: {w}", " ".join(w)) for w in ("apple", "river", "stone", "cloud")]
REFUSALS = [(p, "I cannot help with that.") for p, _ in HARMFUL]


def _jsonl(path, pairs):
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    return path


def _adapter(tmp_path):
    lora = LoraSettings(r=4, alpha=8.0, target_modules=TARGETS)
    model = apply_lora(build_tiny_model(seed=0), lora)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return save_adapter(get_lora_factors(model), lora, tmp_path / "ft_adapter", "tiny-llama")


def test_ray_train_restoration_equals_the_in_process_one(tmp_path, local_ray):
    common = ["model.name_or_path=tiny-llama", f"fine_tuned.adapter={_adapter(tmp_path)}",
              f"harmful.path={_jsonl(tmp_path / 'h.jsonl', HARMFUL)}",
              f"retain.path={_jsonl(tmp_path / 't.jsonl', TASK)}",
              f"refusal.path={_jsonl(tmp_path / 'r.jsonl', REFUSALS)}",
              "restore.max_iters=3", "restore.lbfgs_probes=1", "device=cpu"]
    here = run_restore(load_config(RestoreConfig, None, [*common, f"output.dir={tmp_path / 'here'}"]))
    on_ray = run_restore(load_config(RestoreConfig, None, [
        *common, f"output.dir={tmp_path / 'ray'}", "scaling.use_ray=true", "scaling.cpus_per_worker=1",
        "scaling.torch_threads=1"]))
    assert (on_ray / "ray_train").is_dir()  # Ray Train's record: the worker ran it
    ours, theirs = (json.loads((d / "restore.json").read_text()) for d in (here, on_ray))
    assert theirs["iterations"] == ours["iterations"] >= 1 and theirs["stop_reason"] == ours["stop_reason"]
    for key in ("harmful", "task", "refusal"):
        for state in ("fine_tuned", "restored"):
            assert theirs["losses"][key][state] == pytest.approx(ours["losses"][key][state], abs=1e-5)
    assert [h["refusal"] for h in theirs["history"]] == pytest.approx([h["refusal"] for h in ours["history"]],
                                                                       abs=1e-5)
    factors_here, _ = load_adapter_state(here / "adapter")
    factors_ray, _ = load_adapter_state(on_ray / "adapter")
    assert factors_here.keys() == factors_ray.keys()
    for name, (A, B) in factors_here.items():
        torch.testing.assert_close(factors_ray[name][0], A, rtol=0, atol=1e-5)
        torch.testing.assert_close(factors_ray[name][1], B, rtol=0, atol=1e-5)

