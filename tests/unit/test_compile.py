"""scoring.compile: the compiled reduction equals the eager one and the real-SGD oracle; auto's rule and fall-back.

Compiling is slow on 2 cores: one compiled function serves every test here (torch.compile caches it per process),
on the tiny model only.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import yaml

from sqsd_ray.cli import main
from sqsd_ray.data.tokenize import collate
from sqsd_ray.models.tiny import build_tiny_model, build_tiny_tokenizer
from sqsd_ray.scoring import compiled as compiled_module
from sqsd_ray.scoring.compiled import CompileDecision, CompiledReduction, CompileUnavailable, decide_compile
from tests.conftest import ORACLE_ATOL, save_random_directions
from tests.unit.test_kernel import RANK, _direction, _oracle_projections, _random_factors, _scorer, _tokenized

COLUMNS = ("sqsd", "danger_proj", "safety_proj", "sqsd_raw", "danger_proj_raw", "safety_proj_raw")
CPU = torch.device("cpu")


@pytest.mark.slow
def test_compiled_equals_eager_and_both_meet_the_real_sgd_oracle():
    tokenizer = build_tiny_tokenizer()
    base = build_tiny_model("llama", seed=0, dtype=torch.float64)
    states = {"danger": _random_factors(base, RANK, seed=1), "safety": _random_factors(base, RANK, seed=2)}
    directions = {"danger": _direction(base, 3), "safety": _direction(base, 4)}
    tokenized = _tokenized(tokenizer)
    eager = _scorer(base, states, directions)
    compiled = _scorer(base, states, directions, reduction=CompiledReduction(CompileDecision("on", True, "test")))
    padded = collate(tokenized, tokenizer.pad_token_id)  # padded: the mask path
    single = collate(tokenized[:1], tokenizer.pad_token_id)  # nothing padded: an all-True mask
    for batch in (padded, single):
        want, got = eager.score_batch(batch), compiled.score_batch(batch)
        for column in COLUMNS:
            np.testing.assert_allclose(got[column], want[column], rtol=0, atol=1e-6, err_msg=column)
    assert compiled.reduction.active and compiled.reduction.calls > 0, "the reduction fell back to eager"
    # and it ran as compiled graphs: far fewer operators dispatched than the eager reduction (bench/kernel.py (e))
    assert _operators(compiled, single) < 0.8 * _operators(eager, single)
    out = compiled.score_batch(padded)
    for i, t in enumerate(tokenized):
        for d_name in ("danger", "safety"):
            _, normed, raw = _oracle_projections(base, states[d_name], directions[d_name], t.input_ids, t.labels)
            assert out[f"{d_name}_proj"][i] == pytest.approx(normed, abs=ORACLE_ATOL)
            assert out[f"{d_name}_proj_raw"][i] == pytest.approx(raw, abs=ORACLE_ATOL, rel=1e-4)


def _operators(scorer, batch) -> int:
    from torch.profiler import profile

    with profile() as prof:
        scorer.score_batch(batch)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def test_auto_follows_its_rule():
    assert not decide_compile("off", CPU).compiled
    assert decide_compile("on", CPU).compiled
    assert decide_compile("auto", torch.device("cuda")).compiled  # the rule only: nothing runs on the device
    on_cpu = decide_compile("auto", CPU)
    assert not on_cpu.compiled and on_cpu.reason.startswith("auto: eager on cpu")
    assert not decide_compile("auto", torch.device("mps")).compiled


def test_without_a_compiler_auto_runs_eagerly_and_on_refuses(monkeypatch):
    monkeypatch.setattr(compiled_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(compiled_module, "AUTO_COMPILES_ON", ("cpu", "cuda"))  # as if auto compiled on CPU
    decision = decide_compile("auto", CPU)
    assert not decision.compiled and "no C++ compiler" in decision.reason
    with pytest.raises(CompileUnavailable, match="scoring.compile: on, but no C\\+\\+ compiler"):
        decide_compile("on", CPU)


@pytest.fixture(scope="module")
def score_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    records = [{"id": f"r{i}", "prompt": f"Question {i}: what is {i} plus {i}?", "response": f"It is {2 * i}."}
               for i in range(6)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    save_random_directions(root, "tiny-llama")
    config = {"model": {"name_or_path": "tiny-llama", "attn_implementation": "eager"},
              "data": {"path": str(root / "corpus.jsonl"), "max_length": 64},
              "directions": {"danger": str(root / "danger.safetensors"), "safety": str(root / "safety.safetensors")},
              "batching": {"max_batch_size": 3}, "ray": {"enabled": False}}
    (root / "score.yaml").write_text(yaml.safe_dump(config))
    assert main(["score", "--config", str(root / "score.yaml"), "--set", f"output.dir={root / 'eager'}",
                 "--set", "scoring.compile=off"]) == 0
    return root


def _failing_compile(*args, **kwargs):
    def compiled(*a, **k):
        raise RuntimeError("backend exploded\nsecond line")
    return compiled


def test_auto_falls_back_to_eager_with_one_line_when_compiling_fails(score_job, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(compiled_module, "AUTO_COMPILES_ON", ("cpu", "cuda"))  # as if auto compiled on CPU (it compiles on CUDA only)
    monkeypatch.setattr(torch, "compile", _failing_compile)
    with caplog.at_level(logging.INFO, logger="sqsd_ray"):
        assert main(["score", "--config", str(score_job / "score.yaml"), "--set", f"output.dir={tmp_path / 'run'}",
                     "--set", "scoring.compile=auto"]) == 0
    failures = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.WARNING
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["kernel"] == {"eager (torch.compile failed: RuntimeError: backend exploded)": 6}
    eager = json.loads((score_job / "eager" / "run.json").read_text())
    assert eager["kernel"] == {"eager (scoring.compile: off)": 6}
    import pandas as pd

    got = pd.read_parquet(tmp_path / "run" / "scores.parquet").set_index("sample_id")
    want = pd.read_parquet(score_job / "eager" / "scores.parquet").set_index("sample_id")
    for column in COLUMNS:
        np.testing.assert_allclose(got.loc[want.index, column], want[column], rtol=0, atol=1e-6, err_msg=column)


def test_on_refuses_to_run_eagerly_when_compiling_fails(score_job, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", _failing_compile)
    assert main(["score", "--config", str(score_job / "score.yaml"), "--set", f"output.dir={tmp_path / 'run'}",
                 "--set", "scoring.compile=on"]) == 2
    assert "scoring.compile: on, but torch.compile failed: RuntimeError: backend exploded" in capsys.readouterr().err
