"""What SPF and restoration cost, and the Adam caveat, measured side by side in one run.

Printed (every ratio from timings taken in this run, interleaved so that machine noise hits both sides):

1. SPF step time / plain step time (LoRA): the same Trainer and batches, plain and ``train.spf`` steps taken
   alternately (goal: <= 1.3);
2. restoration time / one fine-tune epoch on the same data: ``restore`` (curvature-aware and first-order) of a
   harmful fine-tune vs one epoch of that fine-tune;
3. the Adam caveat (docs/spf.md): SPF guarantees <G~_j, G_s,j> >= 0 for the gradient handed to the optimizer,
   not for AdamW's applied update. For plain and SPF fine-tunes on harmful compliance, with SGD and with AdamW:
   the share of (step, tensor) updates that still raise the refusal loss to first order (<G_s,j, Δθ_j> > 0), and
   the refusal-loss rise after the run.

The model must have safety to lose: the default is the demo's model organism (built and cached on first use);
``--model DIR`` takes any aligned model directory (e.g. the demo's aligned SmolLM2 under ~/.cache/sqsd-ray).

    PYTHONPATH=. python bench/mitigation.py [--model DIR] [--steps 6] [--out bench_mitigation.json]
"""

from __future__ import annotations

from sqsd_ray.cpu_kernels import pin_cpu_kernels

pin_cpu_kernels()  # before torch loads, as `sqsd-ray demo` does: AVX2 kernels (SQSD_CPU_KERNELS=native: the CPU's own)

import argparse
import copy
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from sqsd_ray.data.records import DataConfig, load_samples
from sqsd_ray.data.tokenize import collate, tokenize_samples
from sqsd_ray.demo import world
from sqsd_ray.models.loading import ModelConfig, load_model_and_tokenizer
from sqsd_ray.models.lora import LoraSettings, apply_lora
from sqsd_ray.training.config import TrainSettings
from sqsd_ray.training.examples import TrainingExample
from sqsd_ray.training.objectives import token_mean_nll
from sqsd_ray.training.spf import SpfSettings
from sqsd_ray.training.trainer import Trainer


def _examples(rows: list[dict], tokenizer, max_length: int) -> list[TrainingExample]:
    with tempfile.TemporaryDirectory() as tmp:
        path = world.write_jsonl(rows, Path(tmp) / "rows.jsonl")
        data = DataConfig(path=str(path), max_length=max_length)
        samples, report = load_samples(data)
        return [TrainingExample(t) for t in tokenize_samples(samples, tokenizer, data, report)]


def _loss(model, examples: list[TrainingExample], pad: int) -> float:
    """The refusal set's token-mean NLL, measured as the mitigate stage measures it."""
    return token_mean_nll(model, [collate([e.chosen for e in examples], pad)])


def _trainer(base, examples, pad, refusals, spf: bool, steps: int, lr: float, batch: int, optimizer: str = "adamw",
             safety_batch: int = 1, min_norm: float = 1e-8):
    torch.manual_seed(0)
    model = apply_lora(copy.deepcopy(base), LoraSettings(r=8, alpha=16.0, dropout=0.0))
    settings = TrainSettings(lr=lr, batch_size=batch, max_steps=steps, lr_schedule="constant", max_grad_norm=None,
                             spf=SpfSettings(enabled=spf, safety_batch_size=safety_batch, min_norm=min_norm))
    trainer = Trainer(model, examples, settings, pad, refusals=refusals)  # plain runs use them only to measure
    if optimizer == "sgd":
        trainer.optimizer = torch.optim.SGD([p for _, p in trainer.named_params], lr=lr)
    return trainer


def step_time_ratio(base, examples, pad, refusals, steps: int, batch: int, safety_batch: int) -> dict:
    plain = _trainer(base, examples, pad, refusals, False, 10 * steps, 1e-4, batch)
    spf = _trainer(base, examples, pad, refusals, True, 10 * steps, 1e-4, batch, safety_batch=safety_batch)
    plain.train_step(), spf.train_step()  # warm-up
    times = {"plain": [], "spf": []}
    for _ in range(steps):
        for name, trainer in (("plain", plain), ("spf", spf)):
            started = time.perf_counter()
            trainer.train_step()
            times[name].append(time.perf_counter() - started)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"plain_step_s": med["plain"], "spf_step_s": med["spf"], "ratio": med["spf"] / med["plain"]}


def adam_caveat(base, examples, pad, refusals, steps: int, batch: int, lr: float, min_norm: float) -> list[dict]:
    rows = []
    for optimizer in ("sgd", "adamw"):
        for spf in (False, True):
            trainer = _trainer(base, examples, pad, refusals, spf, steps, lr if optimizer == "adamw" else 50 * lr,
                               batch, optimizer, min_norm=min_norm)
            before = _loss(trainer.model, refusals, pad)
            conflicting = total = 0
            for _ in range(steps):
                g_s = trainer._refusal_gradients()
                old = {n: p.detach().clone() for n, p in trainer.named_params}
                trainer.train_step()
                for name, p in trainer.named_params:
                    step = p.detach() - old[name]
                    change = float((g_s[name] * step).sum())
                    # a projected tensor's update is orthogonal to G_s, but Δθ read back as new − old fp32 weights
                    # carries rounding of order 1e-3 of itself: count a conflict only above that
                    scale = float(g_s[name].norm() * step.norm())
                    conflicting += change > 1e-3 * scale
                    total += 1
            rows.append({"optimizer": optimizer, "spf": spf, "raising_updates": conflicting / total,
                         "refusal_loss_rise": _loss(trainer.model, refusals, pad) - before})
    return rows


def restore_vs_epoch(model_dir: str, harmful_rows: list[dict], task_rows: list[dict], max_length: int) -> dict:
    from sqsd_ray.config import from_dict
    from sqsd_ray.mitigation.restore_job import RestoreConfig, run_restore
    from sqsd_ray.training.config import TrainJobConfig
    from sqsd_ray.training.loop import load_run, run_training

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = world.write_jsonl(harmful_rows[: len(harmful_rows) // 2] + task_rows, root / "ft.jsonl")
        restore_harmful = world.write_jsonl(harmful_rows[len(harmful_rows) // 2:], root / "harmful.jsonl")
        retain = world.write_jsonl(task_rows, root / "retain.jsonl")
        data = {"max_length": max_length}
        started = time.perf_counter()
        run = run_training(from_dict(TrainJobConfig, {
            "model": {"name_or_path": model_dir, "attn_implementation": "eager"}, "lora": {"r": 8, "alpha": 16.0},
            "data": {"path": str(corpus), **data},
            "train": {"lr": 1e-3, "batch_size": 8, "epochs": 1, "checkpoint_every": 0, "lr_schedule": "constant"},
            "scaling": {"use_ray": False}, "output": {"dir": str(root / "ft"), "overwrite": True}}))
        epoch = time.perf_counter() - started
        result = {"epoch_s": epoch, "epoch_samples": len(harmful_rows) // 2 + len(task_rows)}
        for preconditioner in ("lbfgs", "fisher_diag", "none"):
            started = time.perf_counter()
            out = run_restore(from_dict(RestoreConfig, {
                "model": {"name_or_path": model_dir, "attn_implementation": "eager"},
                "fine_tuned": {"adapter": str(load_run(run.dir).final)},
                "harmful": {"path": str(restore_harmful), **data}, "retain": {"path": str(retain), **data},
                "restore": {"preconditioner": preconditioner, "max_iters": 20},
                "device": "cpu", "output": {"dir": str(root / f"restore_{preconditioner}"), "overwrite": True}}))
            seconds = time.perf_counter() - started
            summary = json.loads((out / "restore.json").read_text())
            result[preconditioner] = {"seconds": seconds, "ratio_to_epoch": seconds / epoch,
                                      "iterations": summary.get("iterations"), "stop_reason": summary.get("stop_reason")}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="aligned model dir (default: the demo's model organism)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side; steps of the caveat runs")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW lr of the caveat runs (SGD: 50x)")
    parser.add_argument("--safety-batch", type=int, default=1,
                        help="refusals per safety gradient in the timing (1: the single-sample setting)")
    parser.add_argument("--min-norm", type=float, default=1e-8,
                        help="train.spf.min_norm of the caveat runs (tensors with a smaller ‖G_s‖² are left alone)")
    parser.add_argument("--parts", default="step,caveat,restore", help="which measurements to run")
    parser.add_argument("--out", default=None, help="write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.model is None:
        from sqsd_ray.demo.organism import OrganismConfig, build_organism

        args.model = str(build_organism(OrganismConfig()))
    base, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=args.model, attn_implementation="eager"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    harmful_rows = world.danger_data(0)
    task_rows = [r for r in world.benign_corpus(64, 7) if r["family"] in ("fact", "arithmetic", "list", "howto")]
    random.Random(0).shuffle(harmful_rows)
    harmful = _examples(harmful_rows, tokenizer, args.max_length)
    tasks = _examples(task_rows, tokenizer, args.max_length)
    # the world's own refusals to held-back harmful requests (the built-in pair's words are outside the
    # organism's vocabulary); batch 8 of them per safety gradient
    refusal_rows = [world._sample(world.harmful_prompt(h, v), world.REFUSALS[i % len(world.REFUSALS)], f"refusal-{i}")
                    for i, (h, v) in enumerate(world.harm_split(0).heldout[:8])]
    refusals = _examples(refusal_rows, tokenizer, args.max_length)

    parts = set(args.parts.split(","))
    figures = {"model": args.model}
    if "step" in parts:
        figures["step_time"] = step_time_ratio(base, tasks, pad, refusals, args.steps, args.batch, args.safety_batch)
        s = figures["step_time"]
        print(f"SPF step / plain step (LoRA, batch {args.batch}, {args.safety_batch} refusal(s) per safety "
              f"gradient): {s['ratio']:.2f}  (median {s['spf_step_s'] * 1e3:.0f} ms vs {s['plain_step_s'] * 1e3:.0f} ms)")
    if "caveat" not in parts:
        figures["adam_caveat"] = []
    else:
        figures["adam_caveat"] = adam_caveat(base, harmful, pad, refusals, args.steps, args.batch, args.lr,
                                            args.min_norm)
        print("\nAdam caveat: fine-tuning on harmful compliance; share of (step, tensor) updates that raise the "
              "refusal loss to first order, and the refusal-loss rise")
        print("| optimizer | SPF | raising updates | refusal-loss rise |\n|---|---|---|---|")
        for row in figures["adam_caveat"]:
            print(f"| {row['optimizer']} | {'on' if row['spf'] else 'off'} | {row['raising_updates']:.1%} | "
                  f"{row['refusal_loss_rise']:+.4f} |")
    if "restore" in parts:
        figures["restore"] = r = restore_vs_epoch(args.model, harmful_rows, task_rows, args.max_length)
        print(f"\nrestoration time / one fine-tune epoch ({r['epoch_samples']} samples, {r['epoch_s']:.1f} s):")
        for name in ("lbfgs", "fisher_diag", "none"):
            print(f"  {name:12s} {r[name]['ratio_to_epoch']:.2f}  ({r[name]['seconds']:.1f} s, "
                  f"{r[name]['iterations']} iterations, {r[name]['stop_reason']})")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1, default=float))


if __name__ == "__main__":
    main()
