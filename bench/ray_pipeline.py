"""Throughput of the Ray Data scoring pipeline vs the same BlockScorer in process, in one run.

    python bench/ray_pipeline.py                       # 31,323 Alpaca instructions, tiny model, local Ray, CPU
    python bench/ray_pipeline.py --n-samples 2000      # a quicker look
    python bench/ray_pipeline.py --device cuda --dtype bfloat16 --model smollm2-135m   # on a GPU node

Corpus: the 31k Alpaca instructions in ../shared/data/benign have no outputs; each gets a *templated*
response (deterministic per instruction: one of several openings plus 1-40 filler words chosen by a hash), so
response lengths vary like a real corpus while the bench needs no generation. Directions are random (seeded):
this measures throughput, not what the scores mean.

A third path, ``ray_write_parquet``, runs the same blocks through the same actor pool into Ray Data's own
``write_parquet`` (the sink sqsd-ray used before it wrote each scored block itself, durably, as it arrives):
the ratio ray / ray_write_parquet is what the durable streaming writes cost (goal >= 0.95).

Prints samples/s and tokens/s for every path and their ratios (goal: Ray >= 0.9 × in-process), the padding
fraction actually paid, the padding a GPU batching profile would pay with the same length-sorted blocks, and
peak memory of the driver and of the scoring worker.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqsd_ray.config import from_dict
from sqsd_ray.data.tokenize import length_sorted_batches
from sqsd_ray.models.directions import random_direction
from sqsd_ray.models.loading import ModelConfig, load_model
from sqsd_ray.models.lora import LoraSettings, lora_module_shapes
from sqsd_ray.runtime import LOOPBACK, loopback_only
from sqsd_ray.scoring.job import run_score
from sqsd_ray.scoring.job_config import ScoreJobConfig

OPENINGS = ["Sure.", "Here is one way to do it:", "Good question.", "In short:", "The answer is as follows.",
            "Let me explain.", "Certainly!"]
FILLER = ("the of and to a in is that for it as with was on be by this are or from at which an have not they "
          "you one all were we when your can there use each how their if will up other about out many then them "
          "these so some would make like him into time has look two more write go see number way could people").split()


def templated_response(instruction: str) -> str:
    rng = random.Random(int(hashlib.sha256(instruction.encode()).hexdigest(), 16))
    words = rng.choices(FILLER, k=rng.randint(1, 40))
    return f"{rng.choice(OPENINGS)} {' '.join(words).capitalize()}."


def write_corpus(path: Path, n: int) -> int:
    rows = json.loads((REPO.parent / "shared" / "data" / "benign" / "alpaca_instructions_31k.json").read_text())
    rows = rows[:n]
    with path.open("w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({"id": f"a{i:05d}", "prompt": row["instruction"],
                                "response": templated_response(row["instruction"])}) + "\n")
    return len(rows)


def gpu_profile_padding(lengths: list[int], rows_per_call: int, batch_size: int = 16, max_tokens: int = 8192) -> float:
    """Padding a GPU batching profile pays when each block of ``rows_per_call`` rows is length-sorted."""
    real = padded = 0
    for start in range(0, len(lengths), rows_per_call):
        block = lengths[start:start + rows_per_call]
        for batch in length_sorted_batches(block, max_batch_size=batch_size, max_tokens=max_tokens):
            real += sum(block[i] for i in batch)
            padded += max(block[i] for i in batch) * len(batch)
    return 1.0 - real / padded


def write_parquet_sink(cfg, out: Path) -> dict:
    """The scored stream into Ray Data's ``write_parquet`` (no ledger, no resume): the sink to compare with."""
    import pandas as pd

    from sqsd_ray.data.records import load_samples
    from sqsd_ray.scoring.blocks import sample_rows
    from sqsd_ray.scoring.ray_pool import scoring_dataset

    samples, _ = load_samples(cfg.data)
    rows = sample_rows(samples)
    started = time.perf_counter()
    scoring_dataset(cfg, rows).write_parquet(str(out / "parts"))
    seconds = time.perf_counter() - started
    df = pd.read_parquet(out / "parts")
    df = df[df["status"] != "skipped"]
    df.to_parquet(out / "scores.parquet")
    return {"scoring_s": seconds, "padding_fraction": float(1 - df["n_tokens"].sum() / df["padded_length"].sum()),
            "worker_peak_rss_mb": float(df["worker_peak_rss_mb"].max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-samples", type=int, default=31323)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rows-per-call", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--skip-in-process", action="store_true", help="Ray path only (no ratio)")
    parser.add_argument("--sink-repeats", type=int, default=1,
                        help="run the two Ray sinks this many times each, alternating which goes first")
    parser.add_argument("--compare-n", type=int, default=0,
                        help="measure the Ray/in-process ratio on the first N samples (both paths), then score the "
                        "whole corpus on Ray; 0 = compare on the whole corpus")
    parser.add_argument("--out", type=Path, help="write all numbers as JSON here")
    args = parser.parse_args()

    import pandas as pd
    import ray

    work = Path(tempfile.mkdtemp(prefix="sqsd-bench-"))
    n = write_corpus(work / "corpus.jsonl", args.n_samples)
    model_cfg = ModelConfig(name_or_path=args.model, dtype=args.dtype)
    shapes = lora_module_shapes(load_model(model_cfg), LoraSettings())
    for kind, seed in (("danger", 1), ("safety", 2)):
        random_direction(shapes, rank=8, seed=seed, kind=kind).save(work / f"{kind}.safetensors")
    base = {
        "model": {"name_or_path": args.model, "dtype": args.dtype},
        "data": {"path": str(work / "corpus.jsonl"), "max_length": args.max_length},
        "directions": {"danger": str(work / "danger.safetensors"), "safety": str(work / "safety.safetensors")},
        "batching": {"device": args.device},
        "ray": {"rows_per_call": args.rows_per_call, "profile": "gpu" if args.device == "cuda" else "local"},
    }
    results: dict[str, dict] = {}
    compare_n = args.compare_n or n
    runs = ([] if args.skip_in_process else [("in_process", compare_n)]) + [("ray_write_parquet", compare_n),
                                                                             ("ray", compare_n)]
    if compare_n < n:
        runs.append(("ray_full", n))
    if compare_n < n:
        write_corpus(work / "compare.jsonl", compare_n)
    def score_once(path: str, size: int, out: str) -> tuple[dict, pd.DataFrame, float]:
        cfg_dict = json.loads(json.dumps(base))
        cfg_dict["output"] = {"dir": str(work / out), "overwrite": True}
        cfg_dict["ray"]["enabled"] = path.startswith("ray")
        if size < n:
            cfg_dict["data"]["path"] = str(work / "compare.jsonl")
        cfg = from_dict(ScoreJobConfig, cfg_dict)
        if path.startswith("ray") and not ray.is_initialized():
            loopback_only()
            ray.init(num_cpus=os.cpu_count(), object_store_memory=300_000_000, include_dashboard=False,
                     log_to_driver=False, configure_logging=False, _node_ip_address=LOOPBACK)
        t0 = time.perf_counter()
        if path == "ray_write_parquet":
            run = write_parquet_sink(cfg, work / out)
        else:
            run_score(cfg)
            run = json.loads((work / out / "run.json").read_text())
        wall = time.perf_counter() - t0
        return run, pd.read_parquet(work / out / "scores.parquet", columns=["sample_id", "n_tokens", "sqsd"]), wall

    for path, size in runs:
        run, df, wall = score_once(path, size, path)
        results[path] = {
            "samples": int(len(df)), "wall_s": wall, "scoring_s": run["scoring_s"],
            "samples_per_s": len(df) / run["scoring_s"], "tokens_per_s": float(df["n_tokens"].sum()) / run["scoring_s"],
            "padding_fraction": run.get("padding_fraction"), "worker_peak_rss_mb": run.get("worker_peak_rss_mb"),
        }
        results[path]["_scores"] = df
        print(f"{path:>10}: {len(df)} samples in {run['scoring_s']:.1f} s scoring ({wall:.1f} s wall): "
              f"{results[path]['samples_per_s']:.1f} samples/s, {results[path]['tokens_per_s']:.0f} tokens/s", flush=True)
    paths = [p for p, _ in runs]
    # The two sinks again, alternating which goes first: one pair is within this machine's run-to-run spread.
    sink_s = {"ray_write_parquet": [results["ray_write_parquet"]["scoring_s"]], "ray": [results["ray"]["scoring_s"]]}
    for i in range(1, args.sink_repeats):
        for path in (("ray", "ray_write_parquet") if i % 2 else ("ray_write_parquet", "ray")):
            run, _, _ = score_once(path, compare_n, f"{path}_{i}")
            sink_s[path].append(run["scoring_s"])
            print(f"{path:>10} (repeat {i}): {compare_n / run['scoring_s']:.1f} samples/s", flush=True)

    largest = results.get("ray_full", results["ray"])
    lengths = [int(x) for x in largest["_scores"].sort_values("sample_id")["n_tokens"]]
    driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print(f"device {args.device}, dtype {args.dtype}, model {args.model}, {n} samples (templated responses), "
          f"{os.cpu_count()} CPUs, tokens/sample mean {sum(lengths) / len(lengths):.0f} max {max(lengths)}")
    print(f"{'path':>12} {'samples/s':>10} {'tokens/s':>10} {'padding':>8} {'worker peak RSS':>16}")
    for path in paths:
        r = results[path]
        print(f"{path:>12} {r['samples_per_s']:>10.1f} {r['tokens_per_s']:>10.0f} {r['padding_fraction'] or 0:>8.1%} "
              f"{r['worker_peak_rss_mb'] or 0:>13.0f} MB")
    sink = sum(sink_s["ray_write_parquet"]) / sum(sink_s["ray"])
    print(f"Ray, durable streaming writes / Ray Data's write_parquet, same {compare_n} samples, "
          f"{len(sink_s['ray'])} run(s) of each: {sink:.2f} (goal >= 0.95); per pair: "
          + ", ".join(f"{w / r:.2f}" for w, r in zip(sink_s["ray_write_parquet"], sink_s["ray"])))
    if "in_process" in results:
        ratio = results["ray"]["samples_per_s"] / results["in_process"]["samples_per_s"]
        a = results["ray"]["_scores"].set_index("sample_id")["sqsd"]
        b = results["in_process"]["_scores"].set_index("sample_id")["sqsd"]
        print(f"Ray / in-process throughput on the same {compare_n} samples: {ratio:.2f} (goal >= 0.9); max |Δsqsd| "
              f"between paths "
              f"{float((a - b.loc[a.index]).abs().max()):.2e}")
    for rpc in (64, 256, 1024):
        print(f"GPU batching profile (bs 16, 8192 tokens), blocks of {rpc} rows: padding "
              f"{gpu_profile_padding(lengths, rpc):.1%} (goal <= 10%)")
    print(f"driver peak RSS {driver_rss:.0f} MB")
    if args.out:
        clean = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in results.items()}
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": clean,
                                        "driver_peak_rss_mb": driver_rss}, indent=2))


if __name__ == "__main__":
    main()
