"""What pinning the CPU kernels to AVX2 costs: LoRA training steps with the pin and with the CPU's own kernels.

The kernels are chosen when torch loads, so each measurement is its own process; the two settings alternate
(``--rounds`` times each) so that a busy machine slows both alike, and the ratio of their medians is printed with
the kernels each process reports. The model is SmolLM2-135M-Instruct as shipped by its registry package (the
demo's real model) or the built-in tiny Llama (``--model tiny-llama``).

    PYTHONPATH=. python bench/cpu_kernels.py --rounds 3 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from sqsd_ray.cpu_kernels import ENV, PINS

REPO = Path(__file__).resolve().parent.parent

STEP = """
import json, sys, time
from sqsd_ray.cpu_kernels import pin_cpu_kernels
pin_cpu_kernels(sys.argv[1])
import torch
from peft import LoraConfig, get_peft_model
from sqsd_ray.models.loading import ModelConfig, load_model
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[5]))
model = get_peft_model(load_model(ModelConfig(name_or_path=sys.argv[2])), LoraConfig(
    r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
batch, length, steps = 8, int(sys.argv[4]), int(sys.argv[3])
ids = torch.randint(0, model.config.vocab_size, (batch, length))
def step():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
step()  # warm-up: allocations and first dispatch
started = time.perf_counter()
for _ in range(steps):
    step()
print(json.dumps({"seconds_per_step": (time.perf_counter() - started) / steps,
                  "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def measure(kernels: str, model: str, steps: int, length: int, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (ENV, *PINS["avx2"])}
    result = subprocess.run([sys.executable, "-c", STEP, kernels, model, str(steps), str(length), str(threads)],
                            capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (registry package) or tiny-llama")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed LoRA steps per process (batch 8)")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"avx2": [], "native": []}
    capabilities = {}
    for round_ in range(args.rounds):
        for kernels in ("avx2", "native") if round_ % 2 == 0 else ("native", "avx2"):
            result = measure(kernels, args.model, args.steps, args.length, args.threads)
            times[kernels].append(result["seconds_per_step"])
            capabilities[kernels] = result["capability"]
            print(f"round {round_ + 1} {kernels:6s} ({result['capability']}): {result['seconds_per_step']:.2f} s/step",
                  flush=True)
    pinned, native = statistics.median(times["avx2"]), statistics.median(times["native"])
    print(f"\n{args.model}, LoRA r 8 on 7 modules, batch 8 × {args.length} tokens, {args.threads} threads, "
          f"{args.rounds} rounds × {args.steps} steps")
    print(f"pinned ({capabilities['avx2']}) {pinned:.2f} s/step, native ({capabilities['native']}) {native:.2f} s/step: "
          f"pinned / native = {pinned / native:.2f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
