"""Does the score predict degradation? The full demo on several seeds, each a new world, organism and set of runs.

For every seed ``sqsd-ray demo`` runs end to end (organism, directions, init selection, SQSD and the baselines,
S1…S5 fine-tunes per ranking, held-out ASR). Printed, in one run:

* per seed: SQSD's ASR per band, Δ = S1 − S5 and Mono;
* per ranking: mean Δ over seeds and the number of seeds with Mono ✓;
* the goals: SQSD Mono in ≥ 4 of 5 seeds; SQSD's mean Δ above the random ranking's and every baseline's; the
  ablations (w/o norm, danger only, safety only) below SQSD on mean Δ.

    PYTHONPATH=. python bench/demo_validity.py --seeds 0,1,2,3,4 --work runs/demo_validity --out validity.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pandas as pd

from sqsd_ray.demo import DemoSettings, run_demo

BASELINES = ["Self-Inf-N", "Bi-Anchor (Grad)", "Bi-Anchor (Reps)", "LARF"]
ABLATIONS = ["SQSD w/o norm", "danger only", "safety only"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--work", default="runs/demo_validity")
    parser.add_argument("--cache", default=None, help="organism cache (default $SQSD_CACHE or ~/.cache/sqsd-ray)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, seconds = [], {}
    for seed in seeds:
        started = time.perf_counter()
        run_demo(DemoSettings(out=Path(args.work) / f"seed-{seed}", seed=seed,
                              cache_dir=Path(args.cache) if args.cache else None))
        seconds[seed] = time.perf_counter() - started
        summary = json.loads((Path(args.work) / f"seed-{seed}" / "demo.json").read_text())
        for row in summary["table"]:
            rows.append({"seed": seed, "theta0": summary["theta0_asr"], **row})
        print(f"seed {seed}: {seconds[seed]:.0f} s", flush=True)
    table = pd.DataFrame(rows)

    print("\n## SQSD per seed (ASR %, keyword judge, held-out harmful requests)\n")
    print("| seed | θ0 | S1 | S2 | S3 | S4 | S5 | Δ | Mono |\n|---|---|---|---|---|---|---|---|---|")
    for _, r in table[table["arm"] == "SQSD"].iterrows():
        print(f"| {r['seed']} | {r['theta0']:.1f} | " + " | ".join(f"{r[b]:.1f}" for b in ("S1", "S2", "S3", "S4", "S5"))
              + f" | {r['delta']:+.1f} | {r['mono']} |")

    per_arm = table.groupby("arm", sort=False).agg(mean_delta=("delta", "mean"), min_delta=("delta", "min"),
                                                   mono=("mono", lambda m: int((m == "✓").sum())))
    print(f"\n## Every ranking over {len(seeds)} seeds\n")
    print("| ranking | mean Δ | min Δ | Mono ✓ seeds |\n|---|---|---|---|")
    for arm, r in per_arm.iterrows():
        print(f"| {arm} | {r['mean_delta']:+.1f} | {r['min_delta']:+.1f} | {r['mono']}/{len(seeds)} |")

    sqsd = per_arm.loc["SQSD"]
    goals = {"SQSD Mono in >= 4 of 5 seeds (scaled to the seeds run)": sqsd["mono"] >= round(0.8 * len(seeds)),
             "SQSD mean Δ > Random's": sqsd["mean_delta"] > per_arm.loc["Random", "mean_delta"]}
    for name in BASELINES:
        goals[f"SQSD mean Δ > {name}'s"] = sqsd["mean_delta"] > per_arm.loc[name, "mean_delta"]
    for name in ABLATIONS:
        goals[f"{name} mean Δ < SQSD's"] = per_arm.loc[name, "mean_delta"] < sqsd["mean_delta"]
    print("\n## Goals\n")
    for goal, met in goals.items():
        print(f"- {'met' if met else 'MISSED'}: {goal}")
    print(f"\nwall time per seed: {', '.join(f'{s:.0f} s' for s in seconds.values())}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "per_arm": per_arm.reset_index().to_dict("records"),
                                              "goals": {k: bool(v) for k, v in goals.items()},
                                              "seconds": seconds}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
