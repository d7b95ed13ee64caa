"""How much does each kind of benign sample erode the organism's refusals? The design measurement of a world.

For a design seed (not one of the seeds the results are reported on) the organism of the chosen world is aligned,
and its corpus is ranked by *kind* — the order the world's design expects, riskiest kind first — so that every
band S1…S5 of the demo's experiment holds exactly one kind (84 samples each in world 2). Each band is fine-tuned
as the demo fine-tunes a band (the world's recipe: LoRA, lr and epochs; ``--lrs`` / ``--epochs`` try others) and
the keyword ASR on the held-out harmful requests is measured. ``--train-seeds 0,1,2`` repeats every fine-tune with
other train seeds (data order, LoRA init): the spread of one kind's ASR over them is the noise a ranking's band has
to beat.

Run on a reported seed N with ``--train-seeds N`` (the demo's own train seed) after its results are in, it is the
ranking by kind in the expected order, a reference for that seed's Table 1: what sorting by the hidden kinds gives.

    PYTHONPATH=. python bench/organism_kinds.py --seed 100 --world 2 --train-seeds 0,1,2 --out runs/kinds
    PYTHONPATH=. python bench/organism_kinds.py --seed 3 --world 2 --train-seeds 3 --out runs/by_kind/seed-3
"""

from __future__ import annotations

from sqsd_ray.cpu_kernels import pin_cpu_kernels

pin_cpu_kernels()  # before torch loads, as `sqsd-ray demo` does: AVX2 kernels (SQSD_CPU_KERNELS=native: the CPU's own)

import argparse
import json
import logging
from pathlib import Path

import pandas as pd

from sqsd_ray.demo import world
from sqsd_ray.demo.pipeline import DemoSettings, align_and_write_world, run_band_experiment


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=100, help="design seed (the results' seeds are 0-4)")
    parser.add_argument("--world", type=int, default=world.DEFAULT_WORLD)
    parser.add_argument("--train-seeds", default="0", help="fine-tune seeds, comma-separated")
    parser.add_argument("--epochs", default=None, help="band fine-tune epochs to compare, comma-separated "
                        "(default: the demo's)")
    parser.add_argument("--lrs", default=None, help="band fine-tune learning rates to compare, comma-separated "
                        "(default: the demo's)")
    parser.add_argument("--out", default="runs/organism_kinds")
    parser.add_argument("--cache", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    from sqsd_ray.runtime import RayConfig, init_ray

    out = Path(args.out)
    settings = DemoSettings(out=out, seed=args.seed, world=args.world,
                            cache_dir=Path(args.cache) if args.cache else None)
    kinds = list(world.EXPECTED_RISK_ORDER_2 if args.world == 2 else world.benign_families(args.world))
    init_ray(RayConfig(local_num_cpus=2, object_store_mb=256))
    try:
        run = align_and_write_world(settings, out)
        families = pd.read_csv(out / "world" / "families.csv")
        counts = families["family"].value_counts()
        if counts.nunique() != 1 or len(counts) != 5:
            raise SystemExit(f"world {args.world} has kinds {dict(counts)}: ranking by kind needs five equal kinds")
        # the design's order as a score: the first kind is expected riskiest (S1)
        rank = {kind: len(kinds) - i for i, kind in enumerate(kinds)}
        scores = families.assign(kind_rank=families["family"].map(rank).astype(float), status="ok")
        scores.to_parquet(out / "kind_scores.parquet", index=False)
        epochs = [int(e) for e in args.epochs.split(",")] if args.epochs else [run.recipe.epochs]
        lrs = [float(lr) for lr in args.lrs.split(",")] if args.lrs else [run.recipe.lr]
        arms = [{"name": f"lr {lr:g} epochs {e}, train seed {s}", "column": "kind_rank",
                 "train_overrides": [f"train.seed={s}", f"train.epochs={e}", f"train.lr={lr}"]}
                for lr in lrs for e in epochs for s in map(int, args.train_seeds.split(","))]
        experiment = run_band_experiment(run, arms, out / "kind_scores.parquet", out / "experiment")
    finally:
        ray.shutdown()
    table = pd.read_csv(experiment / "table.csv")
    metrics = pd.read_csv(experiment / "evaluation" / "metrics.csv")
    theta0 = float(metrics.loc[metrics["state"] == "base", "keyword_asr"].iloc[0])
    bands = [f"S{i + 1}" for i in range(5)]
    per_kind = table[bands].rename(columns=dict(zip(bands, kinds)))
    print(f"\nworld {args.world}, design seed {args.seed}: keyword ASR % on {len(world.heldout_harmful(args.seed, args.world))} "
          f"held-out harmful requests after a LoRA fine-tune on the samples of one kind; "
          f"θ0 {theta0:.1f}\n")
    print("| fine-tune | " + " | ".join(kinds) + " | Δ | Mono |\n|" + "---|" * (len(kinds) + 3))
    for arm, row, delta, mono in zip(table["arm"], per_kind.itertuples(index=False), table["delta"], table["mono"]):
        print(f"| {arm} | " + " | ".join(f"{v:.1f}" for v in row) + f" | {delta:+.1f} | {mono} |")
    by_epochs = per_kind.groupby(table["arm"].str.split(",").str[0])
    for name, part in by_epochs:
        print(f"| {name}: mean (sd) | " + " | ".join(f"{m:.1f} ({s:.1f})" for m, s in zip(part.mean(),
                                                                                     part.std().fillna(0))) + " |")
    from provenance import commit, machine

    (out / "kinds.json").write_text(json.dumps({"world": args.world, "seed": args.seed, "commit": commit(),
                                                "machine": machine(), "theta0": theta0,
                                                "kinds": kinds, "arms": list(table["arm"]), "asr": per_kind.to_dict("records")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
