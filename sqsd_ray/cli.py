"""``sqsd-ray`` command line: thin verbs over library functions.

    sqsd-ray score --config jobs/score_tiny.yaml [--set data.max_length=256 ...]
    sqsd-ray score --help-config          # every config key with its type, default and help
    sqsd-ray verify runs/score_tiny       # check a finished score run directory
    sqsd-ray demo [--quick]                       # the embedded default: the whole pipeline on a model organism
    sqsd-ray quickstart [--out runs/quickstart]   # scoring only: tiny random model, real corpus

    sqsd-ray directions build --config jobs/directions_tiny_danger.yaml     # LoRA SFT / DPO -> direction file
    sqsd-ray directions export --run runs/dir --step 40 --kind safety    # another checkpoint as the direction
    sqsd-ray directions validate --config jobs/validate_tiny.yaml        # steering grid, Fig. 5, DS_linear
    sqsd-ray trajectory --config jobs/trajectory_tiny.yaml               # drift projections, Fig. 2, DS_drift
    sqsd-ray trajectory --compare runs/a runs/b --out fig3.png           # several runs side by side (Fig. 3)
    sqsd-ray init select --config jobs/init_tiny.yaml                    # θ_danger, θ_safety -> init_states.yaml
    sqsd-ray evaluate --config jobs/evaluate_tiny.yaml                   # generate + judge model states
    sqsd-ray experiment effectiveness --config jobs/experiment_effectiveness_tiny.yaml   # Table 1 on CPU
    sqsd-ray experiment mitigate --config jobs/experiment_mitigate_tiny.yaml   # curate / SPF / restore, verified
    sqsd-ray larf-layer --config jobs/larf-layer_tiny.yaml               # LARF's safety-sensitive block
    sqsd-ray restore --config jobs/restore_tiny.yaml                     # post-fine-tune safety restoration
    sqsd-ray partition --set scores=runs/x/scores.parquet --set data.path=corpus.jsonl   # S1 ... S5 subsets
    sqsd-ray curate --config jobs/curate_tiny.yaml [--set mode=reweight]   # drop / down-weight the riskiest samples
    sqsd-ray agreement --scores runs/x/scores.parquet --labels labels.jsonl  # AUROC against your own labels

Every --config may be given several times: the files merge key by key, later ones winning.
A failure the tool anticipates (a bad config key, a missing file, a damaged record) is one line on stderr,
exit code 2; `sqsd-ray -v ...` adds its traceback. A Ray Train run whose cluster lost its workers for good (beyond
scaling.max_failures, or not back within scaling.restart_wait_s) exits 3 saying what it kept and how to resume.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from .config import ConfigError, describe, load_config
from .cpu_kernels import CHOICES as CPU_KERNEL_CHOICES
from .cpu_kernels import pin_cpu_kernels
from .data.reference import DATA_DIR_ENV, DEFAULT_DATA_ROOT
from .runtime import WorkersLost

# Failures with a message written for the user (a config key, a file, a record): one line, no traceback.
# ValueError covers ConfigError; the OSErrors listed name the path they concern.
ANTICIPATED = (ConfigError, ValueError, FileExistsError, FileNotFoundError, PermissionError, NotADirectoryError,
               IsADirectoryError)
# Their errors subclass the ones above, but their messages span lines and name no config key: ``models.loading`` turns
# the expected ones into ConfigError, so one that gets here is a surprise and keeps its traceback.
UNANTICIPATED_MODULES = ("transformers", "huggingface_hub")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, action="append", default=None,
                        help="YAML config file (repeatable: later files override earlier keys)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.max_length=512 (repeatable)")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    _add_data_root_arg(parser, "the reference data that ref: names and the defaults read (eval/, benign/, anchors/)")


def _add_data_root_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--data-root", default=None, help=f"folder holding {what}; sets ${DATA_DIR_ENV} for this "
                        f"run and its workers (default: ${DATA_DIR_ENV}, else {DEFAULT_DATA_ROOT}; a data set missing "
                        "there is loaded from the Hugging Face hub where it has one; docs/data.md)")


def _run_job(args: argparse.Namespace, config_cls: type, run, show: str | None = None) -> int:
    """--help-config, or load the config, run the job and print ``show`` from its output directory."""
    if args.help_config:
        print("\n".join(describe(config_cls)))
        return 0
    path = Path(run(load_config(config_cls, args.config, args.overrides)))
    print(f"wrote {path}")
    shown = (path if path.is_dir() else path.parent) / show if show else None
    if shown is not None and shown.exists():
        print(shown.read_text())
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .scoring.job import run_score
    from .scoring.job_config import ScoreJobConfig

    return _run_job(args, ScoreJobConfig, run_score, show="summary.md")


def cmd_verify(args: argparse.Namespace) -> int:
    from .scoring.store import verify_run

    problems = verify_run(Path(args.run_dir))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {args.run_dir} verified")
    return 0


def cmd_directions_build(args: argparse.Namespace) -> int:
    from .dynamics.jobs import DirectionsBuildConfig, run_directions_build

    return _run_job(args, DirectionsBuildConfig, run_directions_build)


def cmd_directions_validate(args: argparse.Namespace) -> int:
    from .dynamics.jobs import ValidateConfig, run_validate

    return _run_job(args, ValidateConfig, run_validate, show="sensitivity.md")


def cmd_trajectory(args: argparse.Namespace) -> int:
    from .dynamics.jobs import TrajectoryConfig, plot_trajectory_grid, run_trajectory

    if args.compare:
        print(f"wrote {plot_trajectory_grid([Path(d) for d in args.compare], Path(args.out))}")
        return 0
    return _run_job(args, TrajectoryConfig, run_trajectory, show="sensitivity.md")


def cmd_init_select(args: argparse.Namespace) -> int:
    from .dynamics.jobs import InitSelectConfig, run_init_select

    return _run_job(args, InitSelectConfig, run_init_select, show="init_states.yaml")


def cmd_directions_export(args: argparse.Namespace) -> int:
    from .dynamics.jobs import export_direction
    from .training.loop import load_run

    run = load_run(args.run)
    out = Path(args.out) if args.out else Path(args.run) / f"{args.kind}-step{args.step or 'final'}.safetensors"
    direction = export_direction(run, args.step, args.kind, out, args.base_model or "unknown")
    print(f"wrote {out} (‖V‖ = {direction.norm():.4g}, from {direction.metadata['checkpoint']})")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from .experiments.partition import PartitionConfig, run_partition

    return _run_job(args, PartitionConfig, run_partition)


def cmd_curate(args: argparse.Namespace) -> int:
    from .mitigation.curate import CurateConfig, run_curate

    return _run_job(args, CurateConfig, run_curate, show="curate.md")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.job import EvalJobConfig, run_evaluate

    return _run_job(args, EvalJobConfig, run_evaluate, show="metrics.csv")


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiments.effectiveness import ExperimentConfig, run_experiment

    args.overrides = [f"kind={args.kind}", *args.overrides]
    return _run_job(args, ExperimentConfig, run_experiment, show="report.md")


def cmd_experiment_mitigate(args: argparse.Namespace) -> int:
    from .experiments.mitigate import MitigateConfig, run_mitigate

    return _run_job(args, MitigateConfig, run_mitigate, show="report.md")


def cmd_larf_layer(args: argparse.Namespace) -> int:
    from .baselines.larf_layer import LarfLayerConfig, run_larf_layer

    return _run_job(args, LarfLayerConfig, run_larf_layer, show="larf_layer.md")


def cmd_restore(args: argparse.Namespace) -> int:
    from .mitigation.restore_job import RestoreConfig, run_restore

    return _run_job(args, RestoreConfig, run_restore, show="restore.md")


def cmd_length_bias(args: argparse.Namespace) -> int:
    from .scoring.length_bias import run_length_bias

    out = run_length_bias(args.scores, args.columns, args.out, args.bands, args.experiment_table)
    print((out / "length_bias.md").read_text())
    return 0


def cmd_agreement(args: argparse.Namespace) -> int:
    from .scoring.agreement import run_agreement

    out = run_agreement(args.scores, args.labels, args.out, baselines=args.baseline, columns=args.columns,
                        n_resamples=args.n_boot, seed=args.seed)
    print((out / "agreement.md").read_text())
    print(f"wrote {out}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .demo.quickstart import run_quickstart

    path = run_quickstart(Path(args.out), _data_root(args), overrides=args.overrides)
    print(f"wrote {path}")
    print((path.parent / "summary.md").read_text())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    pin_cpu_kernels(args.cpu_kernels)  # before the pipeline imports torch: the kernels are chosen as it loads
    from .demo.pipeline import DemoSettings, run_demo

    report = run_demo(DemoSettings(out=Path(args.out), seed=args.seed, quick=args.quick, model=args.model,
                                   world=args.world, resume=args.resume, threads=args.threads,
                                   data_root=_data_root(args), cache_dir=Path(args.cache) if args.cache else None))
    print(report.read_text())
    print(f"wrote {report.parent}")
    return 0


def _data_root(args: argparse.Namespace) -> Path | None:
    return Path(args.data_root).expanduser() if args.data_root else None


def _job(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    """A verb that runs one config-driven job."""
    parser = sub.add_parser(name, help=help)
    _add_config_args(parser)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sqsd-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and a traceback with every error")
    sub = parser.add_subparsers(dest="command", required=True)

    score = _job(sub, "score", "score every sample of a corpus with SQSD (writes Parquet + summary)", cmd_score)
    score.add_argument("--break-lock", dest="overrides", action="append_const", const="output.break_lock=true",
                       help="take over a run directory's lock held by a process on another host (only when you know "
                       "it is gone)")
    verify = sub.add_parser("verify", help="check a finished score run directory: no run in progress, every part and "
                            "the final scores intact; exit 1 listing each problem")
    verify.add_argument("run_dir", metavar="RUN_DIR", help="output.dir of a score run")
    verify.set_defaults(func=cmd_verify)

    directions = sub.add_parser("directions", help="build, export and validate V_danger / V_safety")
    dsub = directions.add_subparsers(dest="directions_command", required=True)
    _job(dsub, "build", "LoRA SFT (danger) or DPO (safety) from θ0, checkpoints, direction file", cmd_directions_build)
    export = dsub.add_parser("export", help="export another checkpoint of a build run as a direction file")
    export.add_argument("--run", required=True, help="run directory of `directions build`")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the final one)")
    export.add_argument("--kind", choices=("danger", "safety"), required=True, help="what the direction encodes")
    export.add_argument("--out", default=None, help="output .safetensors path")
    export.add_argument("--base-model", default=None, help="base model name recorded in the file")
    export.set_defaults(func=cmd_directions_export)
    _job(dsub, "validate", "steer θ0 + α·V over an α grid: safety per α, Fig. 5, DS_linear", cmd_directions_validate)
    trajectory = _job(sub, "trajectory", "benign fine-tune: drift projections and safety per checkpoint",
                      cmd_trajectory)
    trajectory.add_argument("--compare", nargs="+", metavar="RUN_DIR", default=None,
                            help="instead of running: plot these trajectory runs side by side (Fig. 3) to --out")
    trajectory.add_argument("--out", default="trajectories.png", help="figure written by --compare")

    _job(sub, "evaluate", "generate on harmful prompts and judge: ASR (LlamaGuard / keywords), Safety Score",
         cmd_evaluate)
    _job(sub, "partition", "cut a score file into risk bands S1 (riskiest) ... S5 as fine-tuning sets", cmd_partition)
    _job(sub, "curate", "drop the riskiest samples of a corpus, or down-weight them, by a score file", cmd_curate)

    experiment = sub.add_parser("experiment", help="score -> S1..S5 -> fine-tunes -> evaluation -> report (Tables 1-3)")
    esub = experiment.add_subparsers(dest="kind", required=True)
    for kind, what in (("effectiveness", "Table 1: ASR per risk band for each scoring method / direction"),
                       ("transfer", "Table 2: ranked under one model, fine-tuned under another / at scale / full"),
                       ("ablation", "Table 3: w/o norm, danger only, safety only, insensitive init"),
                       ("lr-sweep", "App. F: the ranking under other fine-tuning learning rates")):
        _job(esub, kind, what, cmd_experiment)
    _job(esub, "mitigate", "plain vs curated vs SPF vs restored fine-tunes on S1 and the whole corpus: safety and "
         "utility of each", cmd_experiment_mitigate)

    _job(sub, "larf-layer", "LARF baseline: find the safety-sensitive block by scaling each block's weights and "
         "measuring refusals on an over-refusal set", cmd_larf_layer)
    _job(sub, "restore", "raise the harmful-completion loss of a fine-tune where the task loss is flat (curvature-aware, "
         "or first-order with restore.preconditioner=none): restored adapter + report", cmd_restore)

    _add_analysis_verbs(sub)

    init = sub.add_parser("init", help="choose the initialisation states θ_danger, θ_safety")
    isub = init.add_subparsers(dest="init_command", required=True)
    _job(isub, "select", "θ_safety = θ0 + α*·V_safety, θ_danger = θ_t* from the sensitivity tables", cmd_init_select)

    _add_demo_verbs(sub)
    return parser


def _add_analysis_verbs(sub) -> None:
    """Verbs that read score files: App. H's length bias, agreement with a user's labels."""
    bias = sub.add_parser("length-bias", help="App. H: response length per rank band and score-length correlation")
    bias.add_argument("--scores", required=True, help="scores.parquet")
    bias.add_argument("--columns", nargs="+", default=["sqsd", "sqsd_raw", "n_response_tokens"],
                      help="score columns (methods) to analyse")
    bias.add_argument("--bands", type=int, default=5, help="rank bands")
    bias.add_argument("--experiment-table", default=None, help="an experiment's table.csv to draw beside (Fig. 7)")
    bias.add_argument("--out", default="runs/length_bias", help="output directory")
    bias.set_defaults(func=cmd_length_bias)

    agree = sub.add_parser("agreement", help="AUROC of each ranking against your own 0/1 labels of harmful samples, "
                           "with bootstrap intervals, against response length alone and within length quintiles")
    agree.add_argument("--scores", required=True, help="scores.parquet of a `score` run")
    agree.add_argument("--labels", required=True, help='JSONL, one {"id": sample_id, "label": 0 or 1} a line '
                       "(1 = harmful to safety)")
    agree.add_argument("--baseline", action="append", default=[], metavar="PATH[:COLUMN]",
                       help="a baseline's score file (its method column is found; name it after ':' otherwise); "
                       "repeatable")
    agree.add_argument("--columns", nargs="+", default=None, help="score columns of --scores (default: sqsd sqsd_raw "
                       "danger_proj neg_safety_proj, where present; neg_safety_proj = −safety_proj)")
    agree.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    agree.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    agree.add_argument("--out", default="runs/agreement", help="output directory")
    agree.set_defaults(func=cmd_agreement)


def _add_demo_verbs(sub) -> None:
    """The embedded defaults: the whole pipeline on a model organism (or SmolLM2), and scoring only."""
    demo = sub.add_parser("demo", help="the whole pipeline on a CPU model organism: align, directions, validate, "
                          "trajectory, init, score (SQSD + baselines), S1..S5 fine-tunes, evaluate, report")
    demo.add_argument("--out", default="runs/demo", help="run directory (replaced, unless --resume)")
    demo.add_argument("--resume", action="store_true", help="continue an interrupted run of the same settings in "
                      "--out: finished directions, sensitivity runs, score files and fine-tunes are kept")
    demo.add_argument("--seed", type=int, default=0, help="seed of the world, the organism and every run")
    demo.add_argument("--quick", action="store_true", help="CI size: smaller corpus, fewer steps, fewer arms")
    demo.add_argument("--model", choices=("organism", "smollm2"), default="organism",
                      help="organism: the CPU model organism on its synthetic world; smollm2: SmolLM2-135M-Instruct "
                      "aligned here, on Dolly/Alpaca and AdvBench/CatQA/HEx-PHI (2 CPU cores: about 1.5 h, just "
                      "under 2 h the first time, when the alignment is trained and cached)")
    demo.add_argument("--world", type=int, choices=(1, 2), default=2,
                      help="organism: the world's version: 2 = risk graded over five kinds of benign samples (the "
                      "default); 1 = one kind carries the risk (the figures published with it; docs/demo.md)")
    demo.add_argument("--threads", type=int, default=None,
                      help="torch threads of the demo's fine-tunes (default: 2 for the organism, so that its figures "
                      "do not depend on the core count; torch's own for smollm2)")
    demo.add_argument("--cpu-kernels", choices=CPU_KERNEL_CHOICES, default=None,
                      help="avx2 (the default, or $SQSD_CPU_KERNELS): torch, MKL and oneDNN use AVX2 kernels on "
                      "every x86-64 CPU, so that an AVX-512 machine computes the figures an AVX2 one does; native: "
                      "the CPU's widest kernels")
    _add_data_root_arg(demo, "smollm2's reference data (benign/, eval/, anchors/)")
    demo.add_argument("--cache", default=None, help="where the organism is cached (default $SQSD_CACHE or "
                      "~/.cache/sqsd-ray)")
    demo.set_defaults(func=cmd_demo)

    quick = sub.add_parser("quickstart", help="embedded default: build directions on a tiny model, score Dolly")
    quick.add_argument("--out", default="runs/quickstart", help="run directory")
    _add_data_root_arg(quick, "the reference data it reads (eval/ AdvBench, benign/ Dolly)")
    quick.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a score config key")
    quick.set_defaults(func=cmd_quickstart)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "data_root", None):
        # through the environment, so that Ray workers started from here resolve ref: names alike; absolute,
        # since their working directory may differ
        os.environ[DATA_DIR_ENV] = str(_data_root(args).resolve())
    try:
        return args.func(args)
    except ANTICIPATED as err:
        if type(err).__module__.split(".")[0] in UNANTICIPATED_MODULES:
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except WorkersLost as err:  # the cluster, not the job: checkpoints kept, a rerun resumes
        if args.verbose:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as err:  # Ctrl-C; a scoring run says what it kept and how to resume
        if args.verbose:
            traceback.print_exc()
        print(str(err) or "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
