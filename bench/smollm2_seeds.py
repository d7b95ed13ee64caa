"""Table 1 on a real model over seeds: the SmolLM2 demo per seed, every ranking, each seed kept on disk.

Each seed aligns its own SmolLM2-135M-Instruct (cached), splits the data anew, builds its directions, picks its
init states, scores the corpus with SQSD and every baseline, and fine-tunes S1…S5 of each ranking (the demo's
sizes: ``Recipe.smollm2``). A seed's stages are kept in ``--work/seed-N/``: run the same command again and it
continues — finished directions, sensitivity runs and score files are kept, each ranking's experiment is its own
directory (a finished one is skipped; an unfinished one continues at its next unfinished band's fine-tune), so
seeds can be run one at a time across sessions. Every invocation's stage times are saved to the seed's
``timings.json`` after each stage, so a run cut short keeps the times of what it finished.

A seed outlives its machine through its *carry* (``sqsd_ray.demo.carry``), written to ``--results/seed-N/`` after
the scores and after each ranking and committed: the alignment's adapter, the world's fingerprints, the score
files and the finished rankings. On a machine without the work folder the seed continues from it — the aligned
model is merged from the adapter and checked bit for bit, the world is written anew and checked file by file, and
only the rankings not done are fine-tuned. ``--carry-only`` saves the carry of a work folder and runs nothing new.

Rankings: SQSD, random, Self-Inf-N, Bi-Anchor (Grad), Bi-Anchor (Reps), LARF, and the ablations SQSD w/o norm,
danger only, safety only (``--rankings all``, the default) or the six non-ablation ones (``--rankings core``).
Each finished seed's figures (per-band ASR per ranking, Δ, Mono, θ0, sizes, commit, machine, times) are written to
``--results/seed-N.json`` (docs/results/smollm2 is committed); the table over every seed found there is printed.

    PYTHONPATH=. python bench/smollm2_seeds.py --seeds 0 --work runs/smollm2_seeds
    PYTHONPATH=. python bench/smollm2_seeds.py --seeds 1,2 --rankings core
    PYTHONPATH=. python bench/smollm2_seeds.py --table-only      # the table over docs/results/smollm2/
"""

from __future__ import annotations

from sqsd_ray.cpu_kernels import pin_cpu_kernels

pin_cpu_kernels()  # before torch loads, as `sqsd-ray demo` does: AVX2 kernels (SQSD_CPU_KERNELS=native: the CPU's own)

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from provenance import commit, machine
from sqsd_ray.demo.carry import SeedCarry
from sqsd_ray.demo.pipeline import (ARMS, DemoSettings, StageTimer, align_and_write_world, experiment_arms,
                                    family_composition, pinned_threads, prepare_scores, run_band_experiment)
from sqsd_ray.demo.smollm2 import aligned_cache_path, rebuild_aligned
from sqsd_ray.experiments.effectiveness import arm_dir_name

CORE = ["SQSD", "Random", "Self-Inf-N", "Bi-Anchor (Grad)", "Bi-Anchor (Reps)", "LARF"]
ABLATIONS = ["SQSD w/o norm", "danger only", "safety only"]
BANDS = ["S1", "S2", "S3", "S4", "S5"]
# torch threads of the seed's own process (the alignment merge, directions, pilot and band fine-tunes): fixed, so
# that a seed continued on a machine with more cores sums in the same order
THREADS = 2
REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results" / "smollm2"


def run_seed(seed: int, work: Path, rankings: list[str], cache: Path | None, carry_dir: Path, quick: bool = False,
             carry_only: bool = False, accept_other_bits: bool = False) -> dict | None:
    """Every stage of one seed, continuing what an earlier invocation left, here or in ``carry_dir`` (a seed
    carried from another machine starts at its rankings); returns the seed's figures once every ranking is done."""
    import ray

    from sqsd_ray.runtime import RayConfig, init_ray

    out = work / f"seed-{seed}"
    carry = SeedCarry(carry_dir)
    settings = DemoSettings(out=out, seed=seed, model="smollm2", resume=True, rankings=rankings, cache_dir=cache,
                            quick=quick)
    started, session = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S")
    if carry.has_scores:
        carry.restore_timings(out / "timings.json")
    # saved after every stage: an invocation cut short (a session's end) keeps the times of what it finished
    stage = StageTimer(on_stage=lambda seconds: _save_timings(out, session, seconds, time.perf_counter() - started))
    if carry_only and not carry.has_scores and not _scores_finished(out, rankings):
        raise SystemExit(f"--carry-only: {out} has not finished its scores (and {carry.folder} holds none): there is "
                         "nothing to carry yet; run the seed without --carry-only")
    init_ray(RayConfig(local_num_cpus=2, object_store_mb=256))
    try:
        with pinned_threads(THREADS):
            run, scores, init_note = _upstream(carry, settings, out, stage, seed, cache, quick, accept_other_bits)
            arms = experiment_arms(run.recipe.arms, scores)
            for i, arm in enumerate(arms):  # one experiment per ranking: an interruption costs one ranking at most
                arm_out = out / "experiment" / arm_dir_name(arm["name"])
                if not (arm_out / "table.csv").is_file():
                    if carry_only:
                        continue
                    with stage(f"experiment {arm['name']}", "S1…S5, a LoRA fine-tune per band, held-out harmful "
                               "prompts"):
                        run_band_experiment(run, [arm], scores["sqsd"], arm_out, include_base=i == 0)
                if not carry.has_ranking(arm["name"], arm_out.name):
                    carry.save_ranking(arm["name"], arm_out)
                carry.save_timings(out / "timings.json")
    finally:
        ray.shutdown()
    _save_timings(out, session, stage.seconds, time.perf_counter() - started)
    carry.save_timings(out / "timings.json")
    if not all((out / "experiment" / arm_dir_name(name) / "table.csv").is_file() for name in rankings):
        return None
    return seed_figures(out, settings, run, init_note, rankings) | {"carry": carry_summary(carry),
                                                                     "torch_threads": THREADS}


def _upstream(carry: SeedCarry, settings: DemoSettings, out: Path, stage: StageTimer, seed: int, cache: Path | None,
              quick: bool, accept_other_bits: bool) -> tuple:
    """(run, {method: score file}, init note): from the carry when it holds the scores, else computed here (and then
    carried)."""
    if not carry.has_scores:
        run, scores, init_note = prepare_scores(settings, out, stage)
        carry.save_upstream(run.files, run.aligned, scores, init_note)
        carry.save_timings(out / "timings.json")
        return run, scores, init_note

    def carried_alignment(files: dict[str, Path]) -> None:
        carry.check_world(files)
        carry.restore_aligned(aligned_cache_path(files, seed, cache, quick), rebuild_aligned, accept_other_bits)

    run = align_and_write_world(settings, out, stage, before_align=carried_alignment)
    restored = carry.restore_rankings(out / "experiment", {name: arm_dir_name(name) for name in settings.rankings})
    logging.info("seed %d continues from %s: %d of %d rankings done there", seed, carry.folder, len(restored),
                 len(settings.rankings))
    return run, carry.restore_scores(), carry.record["init_note"]


def _scores_finished(out: Path, rankings: list[str]) -> bool:
    methods = ["sqsd", *(ARMS[name]["method"] for name in rankings if "method" in ARMS[name])]
    return all((out / "scores" / method / "scores.parquet").is_file() for method in methods)


def carry_summary(carry: SeedCarry) -> dict:
    record = carry.record
    folder = carry.folder.resolve()
    return {"folder": str(folder.relative_to(REPO)) if folder.is_relative_to(REPO) else str(folder),
            "aligned_tensors_sha256": record.get("aligned_tensors_sha256"),
            "aligned_rebuilt_with_other_bits": record.get("aligned_rebuilt_with_other_bits", [])}


def _save_timings(out: Path, session: str, seconds: dict[str, float], wall: float) -> None:
    """This invocation's entry of ``timings.json`` (one per invocation, keyed by its start), written anew."""
    path = out / "timings.json"
    sessions = [s for s in (json.loads(path.read_text()) if path.is_file() else []) if s["started"] != session]
    sessions.append({"started": session, "commit": commit(), "machine": machine()["cpu"],
                     "wall_seconds": round(wall, 1), "stage_seconds": dict(seconds)})
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sessions, indent=1))


def seed_figures(out: Path, settings: DemoSettings, run, init_note: str, rankings: list[str]) -> dict:
    tables = [pd.read_csv(out / "experiment" / arm_dir_name(name) / "table.csv") for name in rankings]
    table = pd.concat(tables, ignore_index=True)
    first = out / "experiment" / arm_dir_name(rankings[0]) / "evaluation" / "metrics.csv"
    metrics = pd.read_csv(first)
    theta0 = float(metrics.loc[metrics["state"] == "base", "keyword_asr"].iloc[0])
    bands = {name: pd.read_csv(out / "experiment" / arm_dir_name(name) / arm_dir_name(name) / "partition"
                               / "partition.csv") for name in rankings}
    composition = family_composition(bands, pd.read_csv(out / "world" / "families.csv"))
    aligned = json.loads((Path(run.aligned) / "aligned.json").read_text())
    timings = json.loads((out / "timings.json").read_text())
    stage_seconds: dict[str, float] = {}
    for session in timings:
        for name, secs in session["stage_seconds"].items():
            stage_seconds[name] = round(stage_seconds.get(name, 0.0) + secs, 1)
    recipe = asdict(run.recipe)
    # a seed may be finished over several invocations: the commits they ran; stage times add up over them
    commits = sorted({session.get("commit", "unknown") for session in timings})
    return {"seed": settings.seed, "model": "SmolLM2-135M-Instruct (aligned here)", "commit": ", ".join(commits),
            "machine": machine(), "theta0_asr": theta0, "init": init_note,
            "aligned": {k: aligned[k] for k in ("refusal_before", "refusal_after", "n_eval", "steps")},
            "sizes": {k: recipe[k] for k in ("corpus_size", "max_length", "direction_steps", "direction_lr",
                                             "pilot_steps", "pilot_lr", "lr", "epochs", "max_new_tokens",
                                             "eval_limit")} | {"band_size": run.band_size, "batch_size": 8,
                                                               "judge": "keyword", "decoding": "greedy"},
            "table": [{"ranking": r["arm"], **{b: float(r[b]) for b in BANDS}, "delta": float(r["delta"]),
                       "mono": r["mono"]} for r in table.to_dict("records")],
            "s1_composition": composition.to_dict("records"),
            "stage_seconds": stage_seconds, "sessions": len(timings),
            "wall_minutes_excluding_alignment": round(sum(v for k, v in stage_seconds.items() if k != "align") / 60,
                                                      1)}


def print_table(results: list[dict]) -> None:
    """Per seed Δ and Mono of every ranking, the means, and the pre-registered goals (docs/demo.md)."""
    rows = [{"seed": r["seed"], "theta0": r["theta0_asr"], **row} for r in results for row in r["table"]]
    frame = pd.DataFrame(rows)
    order = [name for name in ARMS if name in set(frame["ranking"])]
    seeds = sorted(frame["seed"].unique())
    print("\n| ranking | " + " | ".join(f"seed {s}: Δ (Mono)" for s in seeds) + " | mean Δ | Mono |")
    print("|---" * (len(seeds) + 3) + "|")
    means = {}
    for name in order:
        part = frame[frame["ranking"] == name].set_index("seed")
        means[name] = part["delta"].mean()
        cells = [f"{part.loc[s, 'delta']:+.1f} ({part.loc[s, 'mono']})" if s in part.index else "—" for s in seeds]
        print(f"| {name} | " + " | ".join(cells) + f" | {means[name]:+.1f} | {(part['mono'] == '✓').sum()}/{len(part)} |")
    print("\nθ0 ASR per seed: " + ", ".join(f"{r['seed']}: {r['theta0_asr']:.1f}" for r in results))
    sqsd = frame[frame["ranking"] == "SQSD"]
    print("\nGoals (pre-registered in docs/demo.md, '## SmolLM2 over seeds'):")
    for name in [n for n in order if n not in ("SQSD", "danger only", "safety only")]:
        print(f"- {'met' if means['SQSD'] > means[name] else 'MISSED'}: SQSD mean Δ ({means['SQSD']:+.1f}) above "
              f"{name}'s ({means[name]:+.1f})")
    mono = int((sqsd["mono"] == "✓").sum())
    need = -(-2 * len(sqsd) // 3)  # 2 of 3, scaled to the seeds run
    print(f"- {'met' if mono >= need else 'MISSED'}: SQSD Mono in {mono} of {len(sqsd)} seeds (goal ≥ {need})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--work", default="runs/smollm2_seeds", help="where each seed's runs are kept")
    parser.add_argument("--rankings", choices=("all", "core"), default="all",
                        help="all nine rankings, or the six non-ablation ones")
    parser.add_argument("--results", default=str(RESULTS), help="where each finished seed's JSON is written")
    parser.add_argument("--cache", default=None, help="cache of aligned models (default $SQSD_CACHE or ~/.cache)")
    parser.add_argument("--table-only", action="store_true", help="print the table over --results and stop")
    parser.add_argument("--carry-only", action="store_true", help="save the carry of what --work finished (scores, "
                        "rankings) to --results/seed-N/ and start nothing new")
    parser.add_argument("--fresh", action="store_true", help="run the seed from the start: its carry folder, work "
                        "folder and seed-N.json are removed first (the aligned model's cache is kept: the same "
                        "alignment data, seed and kernels train the same weights)")
    parser.add_argument("--accept-other-bits", action="store_true", help="continue a carried seed even when the "
                        "aligned model merged here differs in bits from the carried one (recorded in the results)")
    parser.add_argument("--quick", action="store_true", help="the wiring at toy size (demo --quick's sizes); its "
                        "results go to --work/results, never to the published ones")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results_dir = Path(args.work) / "results" if args.quick else Path(args.results)
    if not args.table_only:
        rankings = CORE + ABLATIONS if args.rankings == "all" else CORE
        for seed in (int(s) for s in args.seeds.split(",")):
            carry_dir = results_dir / f"seed-{seed}"
            if args.fresh:
                shutil.rmtree(carry_dir, ignore_errors=True)
                shutil.rmtree(Path(args.work) / f"seed-{seed}", ignore_errors=True)
                (results_dir / f"seed-{seed}.json").unlink(missing_ok=True)
            figures = run_seed(seed, Path(args.work), rankings, Path(args.cache) if args.cache else None, carry_dir,
                               args.quick, args.carry_only, args.accept_other_bits)
            if figures is None:
                print(f"seed {seed}: not finished; what it finished is kept in {carry_dir}", flush=True)
                continue
            results_dir.mkdir(parents=True, exist_ok=True)
            (results_dir / f"seed-{seed}.json").write_text(json.dumps(figures, indent=1, ensure_ascii=False) + "\n")
            print(f"seed {seed}: {figures['wall_minutes_excluding_alignment']} min without the alignment; wrote "
                  f"{results_dir / f'seed-{seed}.json'}", flush=True)
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("seed-*.json"))]
    if results:
        print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
