"""How far floating point alone moves the demo's Table 1: one seed run twice, differing only in torch's thread count.

Everything the demo does before the band fine-tunes (world, organism, directions, scores) is computed the same way
in both runs; a different number of threads splits the fine-tunes' float sums differently, which is the kind of
difference another CPU makes. Printed: per ranking the largest gap between the runs' band ASRs, Δ and Mono in
both runs; how many SQSD scores differ (and by how much) and how many of the evaluation's greedy responses differ.

    PYTHONPATH=. python bench/fp_spread.py --seed 0 --world 2 --threads 1,2 --work runs/fp_spread
    PYTHONPATH=. python bench/fp_spread.py --runs runs/demo_validity/world-2/seed-0 runs/fp_spread/threads-1  # kept runs
"""

from __future__ import annotations

from sqsd_ray.cpu_kernels import pin_cpu_kernels

pin_cpu_kernels()  # before torch loads, as `sqsd-ray demo` does: AVX2 kernels (SQSD_CPU_KERNELS=native: the CPU's own)

import argparse
import json
from pathlib import Path

import pandas as pd

from sqsd_ray.demo.pipeline import DemoSettings, run_demo
from sqsd_ray.demo.published import BANDS
from sqsd_ray.scoring.summary import markdown_table

def compare(first: Path, second: Path) -> dict:
    """Table 1 of two demo runs side by side: per ranking the largest band gap, both Δ and both Mono."""
    a, b = (pd.DataFrame(json.loads((run / "demo.json").read_text())["table"]).set_index("arm") for run in (first, second))
    rows = []
    for arm in a.index:
        gaps = (a.loc[arm, list(BANDS)] - b.loc[arm, list(BANDS)]).abs()
        rows.append({"ranking": arm, "max band gap": float(gaps.max()), "bands that differ": int((gaps > 0).sum()),
                     "Δ first": float(a.loc[arm, "delta"]), "Δ second": float(b.loc[arm, "delta"]),
                     "Mono": f"{a.loc[arm, 'mono']} / {b.loc[arm, 'mono']}"})
    responses = [pd.read_parquet(run / "experiment" / "evaluation" / "responses.parquet")
                 .set_index(["state", "prompt_id"])["response"] for run in (first, second)]
    joined = pd.concat(responses, axis=1, keys=["first", "second"]).dropna()
    scores = [pd.read_parquet(run / "scores" / "sqsd" / "scores.parquet").set_index("sample_id")["sqsd"]
              for run in (first, second)]
    first_scores, second_scores = scores[0], scores[1].loc[scores[0].index]
    return {"table": pd.DataFrame(rows), "responses": len(joined),
            "responses_differ": int((joined["first"] != joined["second"]).sum()),
            "scores_differ": int((first_scores != second_scores).sum()), "scores": len(first_scores),
            "score_max_abs_diff": float((first_scores - second_scores).abs().max()),
            "score_rank_correlation": float(first_scores.rank().corr(second_scores.rank()))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world", type=int, choices=(1, 2), default=2)
    parser.add_argument("--threads", default="1,2", help="two thread counts, comma-separated")
    parser.add_argument("--work", default="runs/fp_spread")
    parser.add_argument("--cache", default=None, help="organism cache (default $SQSD_CACHE or ~/.cache/sqsd-ray)")
    parser.add_argument("--runs", nargs=2, type=Path, default=None, help="compare two kept demo runs instead")
    args = parser.parse_args()
    if args.runs:
        runs = args.runs
    else:
        counts = [int(t) for t in args.threads.split(",")]
        if len(counts) != 2:
            parser.error("--threads takes two thread counts")
        runs = [Path(args.work) / f"seed-{args.seed}-threads-{t}" for t in counts]
        for threads, run in zip(counts, runs):
            if not (run / "demo.json").is_file():
                run_demo(DemoSettings(out=run, seed=args.seed, world=args.world, threads=threads,
                                      cache_dir=Path(args.cache) if args.cache else None))
    result = compare(*runs)
    print(f"first: {runs[0]}\nsecond: {runs[1]}\n")
    print("\n".join(markdown_table(result["table"])))
    print(f"\nSQSD scores that differ: {result['scores_differ']} of {result['scores']} (largest gap "
          f"{result['score_max_abs_diff']:.2g}, rank correlation {result['score_rank_correlation']:.6f}); "
          f"greedy responses that differ: {result['responses_differ']} of {result['responses']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
