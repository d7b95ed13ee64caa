"""Benchmark of the SQSD scoring kernel against the ways one could compute the same numbers (STYLE 13).

Every ratio comes from ONE run: each path is warmed up, then timed ``--repeats`` times in alternating (rotated)
order with a device sync around each timing, and the median is reported, so that other load on the machine
hits all paths alike. Per model (``--models``) it prints:

(a) overhead: scoring time / plain LoRA forward+backward time on the same padded batches, per init state.
    "Plain" = the same peft model with the init-state adapter active, forward, Σ per-sample mean response NLL,
    backward into the LoRA A and B weights (a LoRA training step without the optimizer step). Goal ≤ 1.25.
(b) the kernel vs a batch-1 loop that takes a real ``torch.optim.SGD`` step per sample the way peer tools do:
    save LoRA state, forward, backward (HF's loss), step, ΔW_m = s(B'A' − B0A0)/η formed densely (d_out × d_in)
    per module, projected onto the dense direction V_m = s_v B_v A_v, LoRA state restored.
(c) the kernel vs torch.func per-sample gradients, ``vmap(grad(loss))`` over the padded batch with
    ``functional_call`` on the peft model (LoRA params of the active adapter only), followed by the kernel's
    FACTORED projections (``kernel.update_inner`` / ``update_norm_sq``), so only the gradient method differs.
    The variant that ran is printed: vmap with the 2D padding mask, vmap with a precomputed 4D additive mask
    (HF mask creation has data-dependent branches), or a per-sample ``grad`` loop as the last resort.
(d) batching on this device: the kernel with bs 1, length-sorted batches of 4 and 8, a token budget, and the
    default ``BatchingConfig().resolve()`` layout; samples/s, tokens/s and padding fraction for each; and the layout
    ``batching.layout: auto`` picks (``scoring.blocks.calibrate_layout`` on the same samples), against the fastest
    layout and the loop of (b).
(e) the compiled reduction (``scoring.compile: on``) at the default layout: (a) eager vs compiled, scoring time
    compiled vs eager, the first calls' time (compiling), and the aten operators dispatched per sample (torch
    profiler): plain fwd+bwd, eager scoring, compiled scoring, and what the scoring adds per LoRA module and pass.

Correctness is checked inline, untimed: the kernel's summed danger/safety projections must equal an exact
oracle, the same batch-1 SGD loop with the adapter's LoRA weights in float64 and η = 1e-7, to 1e-4 (fp32);
the kernel must also agree with torch.func and with itself across layouts. A benchmark of a wrong kernel is
worthless, so the exit status is 1 when a check fails.

Timing on a shared CPU: ratios are taken from medians (headline) and from the fastest run of each path (the
run least disturbed by other processes). ``--threads -1`` (default) drops to 1 torch thread when other
processes already load the machine, because an OpenMP team that shares its cores stalls at every barrier.

Run (CPU here, ≤ 10 min with the defaults; add ``--device cuda --dtype bfloat16`` on a GPU)::

    PYTHONPATH=. python bench/kernel.py --models tiny-llama,smollm2-135m --out bench_kernel.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import re
import resource
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sqsd_ray.data.records import DataConfig, load_samples
from sqsd_ray.data.tokenize import TokenizedSample, collate, length_sorted_batches, tokenize_samples
from sqsd_ray.models.directions import Direction, random_direction
from sqsd_ray.models.loading import ModelConfig, load_model_and_tokenizer
from sqsd_ray.models.lora import LoraSettings, lora_layers, lora_module_shapes
from sqsd_ray.scoring.blocks import build_scorer, calibrate_layout
from sqsd_ray.scoring.compiled import CompileDecision, CompiledReduction
from sqsd_ray.scoring.job_config import (
    BatchingConfig,
    DirectionsConfig,
    InitStateConfig,
    InitStatesConfig,
    KernelConfig,
    ScoreJobConfig,
)
from sqsd_ray.scoring.kernel import (
    ProjectionTarget,
    normalised_projection,
    raw_projection,
    update_inner,
    update_norm_sq,
)
from sqsd_ray.scoring.scorer import SqsdScorer, per_sample_mean_nll

DEFAULT_DATA = "/work/shared/data/benign/dolly_387.jsonl"
PEFT_PREFIX = "base_model.model."
GOAL_OVERHEAD = 1.25  # (a) scoring / plain fwd+bwd per init state
GOAL_COMPILED_OVERHEAD = {"tiny": 1.25, "real": 1.05}  # (e) (a) with the compiled reduction
GOAL_OPS_CUT = 3.0  # (e) operators the scoring adds per module and pass, eager / compiled
GOAL_AUTO_LAYOUT = 1.10  # (d) the auto layout's time / the fastest layout's
GOAL_FUNC_SPEEDUP = 2.0  # (c)
GOAL_LOOP_SPEEDUP = {"cpu": 1.0, "cuda": 10.0}  # (b)
ORACLE_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # max |kernel − batch-1 SGD loop| on summed projections


# ------------------------------------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TimedPath:
    """One timed path: ``run()`` does the whole job over the benchmark samples and returns its result."""

    key: str
    run: Callable[[], object]
    warmup: Callable[[], object]
    times: list[float] = field(default_factory=list)
    result: object = None
    cuda_peak_gib: float | None = None  # extra CUDA memory the path allocated at its peak (first timed round)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)


def time_paths(paths: list[TimedPath], repeats: int, device: torch.device, log: Callable[[str], None]) -> None:
    """Warm each kind of path up once, then time every path ``repeats`` times, rotating the order every round."""
    warmed = set()
    for p in paths:
        kind = p.key.split("@")[0]
        if kind not in warmed:
            p.warmup()
            warmed.add(kind)
    sync(device)
    for r in range(repeats):
        order = paths[r % len(paths):] + paths[: r % len(paths)]
        for p in order:
            gc.collect()
            sync(device)
            if device.type == "cuda" and r == 0:
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            out = p.run()
            sync(device)
            p.times.append(time.perf_counter() - t0)
            if device.type == "cuda" and r == 0:
                p.cuda_peak_gib = (torch.cuda.max_memory_allocated(device) - base) / 2**30
            if p.result is None:
                p.result = out
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{p.key} {p.times[-1]:.2f}s" for p in paths))


# ------------------------------------------------------------------------------------------------ setup


@dataclass
class Layout:
    """A grouping of the samples into padded batches (index lists into the tokenized samples)."""

    name: str
    batches: list[list[int]]
    collated: list[dict] = field(default_factory=list)
    max_batch_size: int = 1  # the spec, to apply the same batching to a whole corpus
    max_tokens: int = 1 << 30

    def stats(self, tokenized: list[TokenizedSample]) -> dict:
        real = sum(len(tokenized[i]) for b in self.batches for i in b)
        padded = sum(len(b) * max(len(tokenized[i]) for i in b) for b in self.batches)
        return {"n_batches": len(self.batches), "max_bs": max(len(b) for b in self.batches), "real_tokens": real,
                "padded_tokens": padded, "padding_fraction": 1.0 - real / padded}


def make_layouts(tokenized, batch_sizes, token_budget, default_bs, default_tokens, pad_id) -> tuple[dict, str]:
    n = len(tokenized)
    specs = [(f"bs{bs}", bs, 1 << 30) for bs in batch_sizes]
    specs.append((f"tok≤{token_budget}", n, token_budget))
    specs.append(("default", default_bs, default_tokens))
    layouts: dict[str, Layout] = {}
    default_name = ""
    for name, bs, tokens in specs:
        batches = length_sorted_batches(tokenized, max_batch_size=min(bs, n), max_tokens=tokens)
        same = next((lay for lay in layouts.values() if lay.batches == batches), None)
        if same is not None:  # e.g. the default layout on CPU is bs1
            if name == "default":
                default_name = same.name
            continue
        layouts[name] = Layout(name, batches, [collate([tokenized[i] for i in b], pad_id) for b in batches], bs, tokens)
        if name == "default":
            default_name = name
    return layouts, default_name


def lora_params(model, adapter: str) -> dict[str, torch.nn.Parameter]:
    """peft parameter name -> LoRA A/B weight of ``adapter`` (in module order)."""
    return {n: p for n, p in model.named_parameters() if f".lora_A.{adapter}." in n or f".lora_B.{adapter}." in n}


def module_keys(module: str, adapter: str) -> tuple[str, str]:
    return f"{PEFT_PREFIX}{module}.lora_A.{adapter}.weight", f"{PEFT_PREFIX}{module}.lora_B.{adapter}.weight"


def to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device)


# ------------------------------------------------------------------------------------------------ paths


def kernel_path(scorer: SqsdScorer, batches: list[dict]) -> Callable[[], dict]:
    def run() -> dict:
        parts = [scorer.score_batch(b) for b in batches]
        return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}

    return run


def plain_path(scorer: SqsdScorer, batches: list[dict]) -> Callable[[], None]:
    """A LoRA training step without the optimizer step, once per init state (same adapters as the scorer)."""
    model, device = scorer.model, scorer.device

    def run() -> None:
        for scoring_pass in scorer.passes:
            name = scoring_pass.state.name
            model.set_adapter(name)
            params = list(lora_params(model, name).values())
            flags = [p.requires_grad for p in params]
            for p in params:
                p.requires_grad_(True)
            for batch in batches:
                input_ids, attention_mask, labels = to_device(batch, device)
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                losses, _ = per_sample_mean_nll(logits, labels)
                del logits
                losses.sum().backward()
                for p in params:
                    p.grad = None
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)

    return run


def dense_directions(directions: dict[str, Direction], device, dtype) -> dict[str, dict[str, tuple]]:
    """Direction -> module -> (V_m = s_v B_v A_v dense on the device, ‖V_m‖): what a dense peer tool keeps."""
    out = {}
    for d_name, direction in directions.items():
        out[d_name] = {}
        for m, f in direction.modules.items():
            v = (f.scaling * f.B.to(device, dtype) @ f.A.to(device, dtype)).contiguous()
            out[d_name][m] = (v, float(v.norm()))
    return out


def sgd_loop_path(
    scorer: SqsdScorer, singles: list[dict], dense_v, eta: float, exact: bool = False
) -> Callable[[], dict]:
    """Batch-1 loop with a real SGD step per sample; ΔW formed densely from the weights before and after.

    ``exact=False`` is the timed peer-tool loop: LoRA weights in their own dtype, so ΔW/η carries the SGD
    step's second-order term and the rounding of B' = B0 − η g_B. ``exact=True`` is the oracle for the
    correctness check: the same loop with the adapter's LoRA weights cast to float64 for the duration (peft
    then runs the LoRA branch in float64) and a tiny η, so ΔW/η is the first-order update to ~1e-9.
    """
    model, device = scorer.model, scorer.device
    layers_by_state = {p.state.name: lora_layers(model, p.state.name) for p in scorer.passes}

    def run() -> dict:
        out: dict[str, np.ndarray] = {}
        for scoring_pass in scorer.passes:
            name = scoring_pass.state.name
            model.set_adapter(name)
            layers = layers_by_state[name]
            params = lora_params(model, name)
            flags = {k: p.requires_grad for k, p in params.items()}
            dtypes = {k: p.dtype for k, p in params.items()}
            for p in params.values():
                p.requires_grad_(True)
                if exact:
                    p.data = p.data.to(torch.float64)
            opt = torch.optim.SGD(list(params.values()), lr=eta)
            rows: dict[str, list[torch.Tensor]] = {d: [] for d in scoring_pass.directions}
            losses = []
            for batch in singles:
                saved = {k: p.detach().clone() for k, p in params.items()}  # copy the LoRA state
                input_ids, attention_mask, labels = to_device(batch, device)
                loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.detach().double())
                with torch.no_grad():
                    inner = {d: [] for d in scoring_pass.directions}
                    dw_norm = []
                    for m, layer in layers.items():
                        key_a, key_b = module_keys(m, name)
                        A0, B0, A1, B1 = saved[key_a], saved[key_b], params[key_a], params[key_b]
                        delta_w = (float(layer.scaling[name]) / eta) * (B1 @ A1 - B0 @ A0)  # dense d_out × d_in
                        dw_norm.append(delta_w.norm())
                        for d_name in scoring_pass.directions:
                            inner[d_name].append((delta_w * dense_v[d_name][m][0]).sum())
                    dw_norm_t = torch.stack(dw_norm).double()  # (M,), kept on the device: one sync per sample
                    for d_name in scoring_pass.directions:
                        ip = torch.stack(inner[d_name]).double()
                        v_norm = torch.tensor([dense_v[d_name][m][1] for m in layers], dtype=torch.float64,
                                              device=ip.device)
                        cos = torch.where(dw_norm_t > 0, ip / (dw_norm_t.clamp_min(1e-300) * v_norm), 0.0)
                        rows[d_name].append(torch.stack([cos.sum(), (ip / v_norm).sum()]))
                    for k, p in params.items():  # restore the LoRA state
                        p.copy_(saved[k])
            for k, p in params.items():
                p.requires_grad_(flags[k])
                p.data = p.data.to(dtypes[k])  # exact: float32 -> float64 -> float32 is lossless
            loss_np = torch.stack(losses).cpu().numpy()
            for d_name, r in rows.items():
                both = torch.stack(r).cpu().numpy()  # (n, 2)
                out[f"{d_name}_proj"], out[f"{d_name}_proj_raw"] = both[:, 0], both[:, 1]
                out[f"loss_{d_name}_state"] = loss_np
        return out

    return run


def additive_mask_4d(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, T) padding mask -> (n, 1, T, T) additive causal+padding mask; per vmapped sample (1, T, T), which
    ``sample_loss`` unsqueezes to the (1, 1, T, T) that HF's mask creation passes through untouched."""
    n, t = attention_mask.shape
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]  # (n, T_q, T_k)
    mask = torch.zeros(n, t, t, dtype=dtype, device=attention_mask.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def func_path(scorer: SqsdScorer, batches: list[dict], targets, variant: str, quiet: bool = True) -> Callable[[], dict]:
    """torch.func per-sample gradients of the active adapter's LoRA weights + the kernel's factored projections."""
    from torch.func import functional_call, grad, vmap

    model, device, acc = scorer.model, scorer.device, scorer.acc_dtype
    model_dtype = scorer.model_dtype
    scalings_by_state = {
        p.state.name: torch.tensor([float(layer.scaling[p.state.name])
                                    for layer in lora_layers(model, p.state.name).values()], dtype=acc)
        for p in scorer.passes
    }

    def sample_loss(params, input_ids, mask, labels):
        logits = functional_call(model, params, args=(), kwargs={
            "input_ids": input_ids[None], "attention_mask": mask[None], "use_cache": False}).logits
        return per_sample_mean_nll(logits, labels[None])[0].sum()

    per_sample_grad = grad(sample_loss)
    batched_grad = vmap(per_sample_grad, in_dims=(None, 0, 0, 0))

    def grads_for(params, input_ids, attention_mask, labels):
        if variant == "vmap-2d-mask":
            return batched_grad(params, input_ids, attention_mask, labels)
        if variant == "vmap-4d-mask":
            return batched_grad(params, input_ids, additive_mask_4d(attention_mask, model_dtype), labels)
        # per-sample grad loop: each sample unpadded, stacked afterwards
        parts = []
        for row in range(input_ids.shape[0]):
            keep = attention_mask[row].bool()
            parts.append(per_sample_grad(params, input_ids[row][keep], attention_mask[row][keep], labels[row][keep]))
        return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}

    def run() -> dict:
        if not quiet:
            return run_all()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # vmap's "no batching rule" notes: reported once by pick_func_variant
            return run_all()

    def run_all() -> dict:
        cols: dict[str, list[np.ndarray]] = {}
        for scoring_pass in scorer.passes:
            name = scoring_pass.state.name
            model.set_adapter(name)
            params = {k: p.detach() for k, p in lora_params(model, name).items()}
            scalings = scalings_by_state[name]
            for d_name in scoring_pass.directions:
                cols.setdefault(f"{d_name}_proj", [])
                cols.setdefault(f"{d_name}_proj_raw", [])
            for batch in batches:
                input_ids, attention_mask, labels = to_device(batch, device)
                g = grads_for(params, input_ids, attention_mask, labels)
                inner = {d: [] for d in scoring_pass.directions}
                norm_sq = []
                for m in scorer.modules:
                    key_a, key_b = module_keys(m, name)
                    g_A, g_B = g[key_a].to(acc), g[key_b].to(acc)
                    A0, B0 = params[key_a].to(acc), params[key_b].to(acc)
                    norm_sq.append(update_norm_sq(g_A, g_B, A0, B0))
                    for d_name in scoring_pass.directions:
                        inner[d_name].append(update_inner(g_A, g_B, targets[name][m][d_name]))
                d_norm_sq = torch.stack(norm_sq, 1).cpu()
                for d_name in scoring_pass.directions:
                    ip = torch.stack(inner[d_name], 1).cpu()
                    v_norm = torch.tensor([targets[name][m][d_name].v_norm for m in scorer.modules], dtype=ip.dtype)
                    cols[f"{d_name}_proj"].append(normalised_projection(ip, d_norm_sq, v_norm).sum(1).numpy())
                    cols[f"{d_name}_proj_raw"].append(raw_projection(ip, scalings, v_norm).sum(1).numpy())
        return {k: np.concatenate(v) for k, v in cols.items()}

    return run


def pick_func_variant(scorer, batches, targets, log) -> tuple[str, dict[str, str], list[str]]:
    """First torch.func variant that runs on two samples; the errors of those that did not; and the ops that
    vmap had no batching rule for (it then loops over the samples for that op, a known slow path)."""
    probe = [collate_rows(batches[0], 2)]
    errors = {}
    for variant in ("vmap-2d-mask", "vmap-4d-mask", "grad-loop"):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                func_path(scorer, probe, targets, variant, quiet=False)()
            unbatched = sorted({m.group(1) for w in caught
                                if (m := re.search(r"batching rule for (\S+?)\.", str(w.message)))})
            return variant, errors, unbatched
        except Exception as exc:  # noqa: BLE001 - we report the failure and try the next variant
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
            where = ""
            if frames:  # the innermost frame outside torch: where the model code tripped over vmap
                f, path = frames[-1], Path(frames[-1].filename)
                where = f" at {path.parent.name}/{path.name}:{f.lineno} `{(f.line or '').strip()[:70]}`"
            first = str(exc).splitlines()[0][:90] if str(exc) else ""
            errors[variant] = f"{type(exc).__name__}{where}: {first}"
            log(f"  torch.func variant {variant} failed: {errors[variant]}")
    raise RuntimeError(f"no torch.func variant ran: {errors}")


def collate_rows(batch: dict, n: int) -> dict:
    return {k: (v[:n] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------ one model


def build_targets(scorer: SqsdScorer, directions: dict[str, Direction], states) -> dict:
    """Init-state adapter -> module -> direction -> ProjectionTarget (what the scorer builds, rebuilt here)."""
    targets = {}
    for p in scorer.passes:
        name = p.state.name
        targets[name] = {
            m: {d: ProjectionTarget.build(*[t.to(scorer.device) for t in p.state.factors[m]],
                                          directions[d].modules[m].A.to(scorer.device),
                                          directions[d].modules[m].B.to(scorer.device),
                                          directions[d].modules[m].scaling, dtype=scorer.acc_dtype)
                for d in p.directions}
            for m in scorer.modules
        }
    return targets


def max_abs_diff(a: dict, b: dict, keys: list[str]) -> dict[str, float]:
    return {k: float(np.max(np.abs(np.asarray(a[k], dtype=np.float64) - np.asarray(b[k], dtype=np.float64))))
            for k in keys}


def reorder(result: dict, order: list[int], n: int) -> dict:
    """Result rows follow ``order`` (sample indices of the layout's batches): put them back in sample order."""
    inv = np.empty(n, dtype=np.int64)
    inv[np.asarray(order)] = np.arange(n)
    return {k: np.asarray(v)[inv] for k, v in result.items() if len(np.asarray(v)) == n}


def corpus_batching(tokenizer, args, layouts: dict[str, Layout], batching: dict, default_name: str) -> dict:
    """Padding of each layout over the whole corpus file (length-sorted batching pads far less there than on a
    few samples), and the speed-up over the default layout it implies: the measured throughput per PADDED
    token of each layout × (1 − the corpus padding fraction). An estimate: it assumes cost ∝ padded tokens."""
    cfg = DataConfig(path=args.data, max_length=args.max_length, limit=args.corpus_limit, on_bad_record="skip")
    samples, report = load_samples(cfg)
    lengths = [len(t) for t in tokenize_samples(samples, tokenizer, cfg, report)]
    out = {"n_samples": len(lengths), "layouts": {}}
    for name, lay in layouts.items():
        batches = length_sorted_batches(lengths, max_batch_size=lay.max_batch_size, max_tokens=lay.max_tokens)
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        padded_tps = batching[name]["padded_tokens"] / batching[name]["median_s"]
        out["layouts"][name] = {"padding_fraction": 1.0 - sum(lengths) / padded,
                                "real_tokens_per_s_est": padded_tps * sum(lengths) / padded}
    ref = out["layouts"][default_name]["real_tokens_per_s_est"]
    for v in out["layouts"].values():
        v["speedup_vs_default_est"] = v["real_tokens_per_s_est"] / ref
    return out


def loss_numerics_check(scorer: SqsdScorer, batch: dict) -> dict:
    """|loss − float64 loss| of one sample for the scorer's ``per_sample_mean_nll`` and for the flattened
    (tokens, vocab) cross-entropy that HF's loss (used by the SGD loop) computes, on the same logits."""
    import torch.nn.functional as F

    model = scorer.model
    model.set_adapter(scorer.passes[0].state.name)
    input_ids, attention_mask, labels = to_device(batch, scorer.device)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        vocab = logits.shape[-1]
        shift = labels[:, 1:].reshape(-1)
        flat = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), shift, ignore_index=-100)
        exact = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).double(), shift, ignore_index=-100)
        ours = per_sample_mean_nll(logits, labels)[0][0]
    return {"vocab": vocab, "tokens": int(input_ids.shape[1]), "loss_float64": float(exact),
            "per_sample_mean_nll_abs_err": abs(float(ours) - float(exact)),
            "flat_cross_entropy_abs_err": abs(float(flat) - float(exact))}


def count_operators(run: Callable[[], object]) -> int:
    """aten operators dispatched by one call of ``run`` (torch profiler; nested calls counted too, as the
    dispatcher sees them; a compiled graph's fused kernels are not operators, its library calls are)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def bench_model(model_name: str, args, device: torch.device, log) -> dict:
    torch._dynamo.reset()  # each model's compile time is its own, not a graph cached from the previous model
    dtype_name = args.dtype
    model_cfg = ModelConfig(name_or_path=model_name, dtype=dtype_name)
    n_samples = args.n_samples_tiny if model_cfg.is_tiny else args.n_samples_small
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tokenizer = load_model_and_tokenizer(model_cfg)
    load_s = time.perf_counter() - t0
    model.to(device)
    n_base_params = sum(p.numel() for p in model.parameters())

    lora = LoraSettings()
    shapes = lora_module_shapes(model, lora)
    directions = {
        "danger": random_direction(shapes, rank=lora.r, seed=11, scale=0.05, kind="danger"),
        "safety": random_direction(shapes, rank=lora.r, seed=12, scale=0.05, kind="safety"),
    }
    cfg = ScoreJobConfig(
        model=model_cfg, lora=lora, scoring=KernelConfig(compile="off"),  # the eager kernel; (e) compiles its own
        directions=DirectionsConfig(danger="<random seed 11>", safety="<random seed 12>"),
        init_states=InitStatesConfig(
            danger=InitStateConfig(kind="random", seed=1, std=0.02),  # stand-in for a pilot checkpoint θ_t*
            safety=InitStateConfig(kind="direction", direction="safety", alpha=1.0),  # θ0 + α·V_safety
        ),
    )
    scorer, states = build_scorer(model, cfg, directions)
    model = scorer.model
    n_passes = len(scorer.passes)
    adapter0 = scorer.passes[0].state.name
    n_lora_params = sum(p.numel() for p in lora_params(model, adapter0).values())
    lora_dtype = next(iter(lora_params(model, adapter0).values())).dtype

    # records whose prompt alone exceeds max_length are skipped: read a few spare ones, keep the first n
    data_cfg = DataConfig(path=args.data, max_length=args.max_length, limit=4 * n_samples + 16)
    samples, report = load_samples(data_cfg)
    tokenized = tokenize_samples(samples, tokenizer, data_cfg, report)[:n_samples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n = len(tokenized)
    lengths = np.array([len(t) for t in tokenized])
    resp = np.array([t.n_response_tokens for t in tokenized])

    _, default_bs, default_tokens = BatchingConfig(device=device.type).resolve()
    layouts, default_name = make_layouts(tokenized, args.batch_sizes, args.token_budget or 2 * args.max_length,
                                         default_bs, default_tokens, pad_id)
    func_name = f"bs{args.func_batch_size}"
    if func_name not in layouts:
        batches = length_sorted_batches(tokenized, max_batch_size=min(args.func_batch_size, n), max_tokens=1 << 30)
        func_name = next((lay.name for lay in layouts.values() if lay.batches == batches), func_name)
        if func_name not in layouts:
            layouts[func_name] = Layout(func_name, batches, [collate([tokenized[i] for i in b], pad_id) for b in batches],
                                        args.func_batch_size)
    singles = [collate([t], pad_id) for t in tokenized]  # batch-1, no padding, sample order
    # warm-up: the two shortest samples (a small padded batch and a single), so warming up costs little
    shortest = sorted(range(n), key=lambda i: len(tokenized[i]))[:2]
    warm_batch = [collate([tokenized[i] for i in shortest], pad_id)]
    warm_single = [collate([tokenized[shortest[0]]], pad_id)]

    # batching.layout: auto on these samples (the eager kernel), as a layout of its own where it is new
    def score_indices(chosen, indices):
        return scorer.score_batch(collate([chosen[i] for i in indices], pad_id))

    auto_choice, _, auto_report = calibrate_layout(score_indices, tokenized, device, args.max_length)
    auto_batches = length_sorted_batches(tokenized, auto_choice.max_batch_size, auto_choice.max_tokens)
    auto_name = next((lay.name for lay in layouts.values() if lay.batches == auto_batches), None)
    if auto_name is None:
        auto_name = "auto"
        layouts[auto_name] = Layout(auto_name, auto_batches, [collate([tokenized[i] for i in b], pad_id)
                                                              for b in auto_batches], auto_choice.max_batch_size,
                                    auto_choice.max_tokens)
    log(f"  batching.layout auto: {auto_report['chosen']} -> layout {auto_name} ({auto_report['seconds']})")
    # the product's default is layout: auto, so (a), (b) and (e) are measured at the layout it picked; the fixed
    # device default (layout: fixed, bs 1 on CPU) stays a row of (d)
    fixed_default_name, default_name = default_name, auto_name

    targets = build_targets(scorer, directions, states)
    dense_v = dense_directions(directions, device, torch.float32 if lora_dtype == torch.float32 else lora_dtype)
    variant, func_errors, func_unbatched = pick_func_variant(scorer, layouts[func_name].collated, targets, log)
    log(f"  torch.func variant: {variant}")

    paths: list[TimedPath] = []
    for lay in layouts.values():
        paths.append(TimedPath(f"kernel@{lay.name}", kernel_path(scorer, lay.collated), kernel_path(scorer, warm_batch)))
    plain_layouts = list(dict.fromkeys([default_name, func_name] if args.plain_at_func_layout else [default_name]))
    for name in plain_layouts:
        lay = layouts[name]
        paths.append(TimedPath(f"plain@{name}", plain_path(scorer, lay.collated), plain_path(scorer, warm_batch)))
    paths.append(TimedPath("sgd-loop@bs1", sgd_loop_path(scorer, singles, dense_v, args.oracle_lr),
                       sgd_loop_path(scorer, warm_single, dense_v, args.oracle_lr)))
    func_lay = layouts[func_name]
    paths.append(TimedPath(f"func@{func_name}", func_path(scorer, func_lay.collated, targets, variant),
                       func_path(scorer, warm_batch, targets, variant)))
    compiled_scorer, compile_first_s = None, None
    if args.compile:
        compiled_scorer = SqsdScorer(model, scorer.passes, reduction=CompiledReduction(CompileDecision("on", True,
                                                                                                       "bench")))
        sync(device)
        t0 = time.perf_counter()
        compiled_scorer.score_batch(warm_batch[0])  # compiles the graph (a batch of one is a second graph)
        compiled_scorer.score_batch(warm_single[0])
        sync(device)
        compile_first_s = time.perf_counter() - t0
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        log(f"  compiled reduction: first calls (compiling) {compile_first_s:.1f} s, {graphs} graph(s), "
            f"{compiled_scorer.reduction.calls} compiled calls, active {compiled_scorer.reduction.active}")
        for name in dict.fromkeys([default_name, fixed_default_name]):  # the auto layout, and bs 1 on CPU
            paths.append(TimedPath(f"compiled@{name}", kernel_path(compiled_scorer, layouts[name].collated),
                                   kernel_path(compiled_scorer, warm_batch)))
    repeats = args.repeats_tiny if model_cfg.is_tiny else args.repeats
    time_paths(paths, repeats, device, log)
    by_key = {p.key: p for p in paths}
    snapshot = {k: p.detach().clone() for k, p in lora_params(model, adapter0).items()}
    oracle = sgd_loop_path(scorer, singles, dense_v, eta=1e-7, exact=True)()  # untimed correctness oracle
    assert all(torch.equal(p, snapshot[k]) for k, p in lora_params(model, adapter0).items()), "LoRA state not restored"

    # --- correctness: kernel (default layout and the func layout) vs the batch-1 SGD loop and torch.func
    proj_keys = ["danger_proj", "safety_proj", "danger_proj_raw", "safety_proj_raw"]
    order = lambda lay: [i for b in lay.batches for i in b]  # noqa: E731
    kern_default = reorder(by_key[f"kernel@{default_name}"].result, order(layouts[default_name]), n)
    kern_func = reorder(by_key[f"kernel@{func_name}"].result, order(func_lay), n)
    loop = by_key["sgd-loop@bs1"].result
    func = reorder(by_key[f"func@{func_name}"].result, order(func_lay), n)
    tol = ORACLE_TOL[torch.float32 if dtype_name == "float32" else torch.bfloat16]
    raw_scale = max(float(np.max(np.abs(oracle[k]))) for k in proj_keys[2:])
    check = {
        "tol": tol,
        "kernel_vs_oracle": max_abs_diff(kern_default, oracle, proj_keys[:2]),
        "kernel_vs_oracle_raw_rel": max(max_abs_diff(kern_default, oracle, proj_keys[2:]).values()) / raw_scale,
        "loss_vs_oracle": float(np.max(np.abs(kern_default["loss_danger_state"] - oracle["loss_danger_state"]))),
        "kernel_vs_func": max_abs_diff(kern_func, func, proj_keys[:2]),
        "kernel_default_vs_func_layout": max_abs_diff(kern_default, kern_func, proj_keys[:2]),
        "peer_loop_vs_oracle": max_abs_diff(loop, oracle, proj_keys[:2]),
    }
    compiled = None
    if compiled_scorer is not None:
        kern_compiled = reorder(by_key[f"compiled@{default_name}"].result, order(layouts[default_name]), n)
        check["compiled_vs_eager"] = max_abs_diff(kern_compiled, kern_default, proj_keys[:2] + ["sqsd"])
        check["compiled_vs_oracle"] = max_abs_diff(kern_compiled, oracle, proj_keys[:2])
        single = singles[int(np.argsort(lengths)[n // 2])]  # a median-length sample, batch of one
        ops_plain = count_operators(plain_path(scorer, [single]))
        ops_eager = count_operators(kernel_path(scorer, [single]))
        ops_compiled = count_operators(kernel_path(compiled_scorer, [single]))
        per = len(scorer.modules) * n_passes
        compiled = {
            "first_calls_compile_s": compile_first_s,
            "a_overhead_eager": by_key[f"kernel@{default_name}"].median / by_key[f"plain@{default_name}"].median,
            "a_overhead_compiled": by_key[f"compiled@{default_name}"].median / by_key[f"plain@{default_name}"].median,
            "speedup_vs_eager": by_key[f"kernel@{default_name}"].median / by_key[f"compiled@{default_name}"].median,
            "operators_per_sample": {"plain": ops_plain, "eager": ops_eager, "compiled": ops_compiled},
            "operators_added_per_module_and_pass": {"eager": (ops_eager - ops_plain) / per,
                                                    "compiled": (ops_compiled - ops_plain) / per},
            "goal_overhead": GOAL_COMPILED_OVERHEAD["tiny" if model_cfg.is_tiny else "real"],
            "speedup_vs_eager_by_layout": {
                name: by_key[f"kernel@{name}"].median / by_key[f"compiled@{name}"].median
                for name in dict.fromkeys([default_name, fixed_default_name])},
        }
        added = compiled["operators_added_per_module_and_pass"]
        compiled["operators_cut"] = added["eager"] / max(added["compiled"], 1e-9)
    check["passed"] = all(max(check[k].values()) <= tol
                          for k in ("kernel_vs_oracle", "kernel_vs_func", "kernel_default_vs_func_layout"))
    if compiled is not None:
        check["passed"] = check["passed"] and max(check["compiled_vs_eager"].values()) <= 1e-6 \
            and max(check["compiled_vs_oracle"].values()) <= tol

    # --- numbers
    tok_total = int(lengths.sum())

    def rate(key: str) -> dict:
        t = by_key[key].median
        out = {"median_s": t, "min_s": by_key[key].best, "runs_s": by_key[key].times, "samples_per_s": n / t,
               "tokens_per_s": tok_total / t}
        if by_key[key].cuda_peak_gib is not None:
            out["cuda_peak_extra_gib"] = by_key[key].cuda_peak_gib
        return out

    timings = {k: rate(k) for k in by_key}

    def ratio(num: str, den: str) -> dict:
        """num/den from the medians (headline) and from the fastest runs (least disturbed by other load)."""
        return {"median": by_key[num].median / by_key[den].median, "min": by_key[num].best / by_key[den].best}

    overhead = {name: ratio(f"kernel@{name}", f"plain@{name}") for name in plain_layouts}
    best_layout = min(layouts, key=lambda name: by_key[f"kernel@{name}"].median)
    loop_speedup = ratio("sgd-loop@bs1", f"kernel@{default_name}")
    loop_speedup_best = ratio("sgd-loop@bs1", f"kernel@{best_layout}")
    func_speedup = ratio(f"func@{func_name}", f"kernel@{func_name}")
    batching = {name: {**lay.stats(tokenized), **rate(f"kernel@{name}")} for name, lay in layouts.items()}
    corpus = corpus_batching(tokenizer, args, layouts, batching, default_name)
    loss_numerics = loss_numerics_check(scorer, singles[int(np.argmax(lengths))])

    mem = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        mem["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    result = {
        "model": model_name, "device": str(device), "dtype": dtype_name,
        "lora_dtype": str(lora_dtype).replace("torch.", ""),
        "load_s": load_s, "base_params": n_base_params, "lora_params_per_state": n_lora_params,
        "lora_modules": len(scorer.modules), "lora_rank": lora.r, "n_passes": n_passes,
        "init_states": {d: s.description for d, s in states.items()},
        "n_samples": n, "data": args.data, "max_length": args.max_length,
        "tokens_per_sample": {"min": int(lengths.min()), "median": float(np.median(lengths)),
                              "mean": float(lengths.mean()), "max": int(lengths.max()), "total": tok_total,
                              "response_mean": float(resp.mean()), "truncated": int(sum(t.truncated for t in tokenized))},
        "default_layout": default_name, "fixed_default_layout": fixed_default_name,
        "default_batching": {"max_batch_size": default_bs, "max_tokens": default_tokens},
        "func_layout": func_name, "func_variant": variant, "func_failed_variants": func_errors,
        "func_unbatched_ops": func_unbatched,
        "oracle_lr": args.oracle_lr, "repeats": repeats, "timings": timings,
        "a_overhead_per_state": overhead,
        "a_per_state_s": {name: {"kernel": by_key[f"kernel@{name}"].median / n_passes,
                                 "plain": by_key[f"plain@{name}"].median / n_passes} for name in plain_layouts},
        "n_tokens_total": tok_total,
        "b_loop_speedup_vs_default": loop_speedup, "b_loop_speedup_vs_best": loop_speedup_best,
        "best_layout": best_layout,
        "c_func_speedup": func_speedup, "d_batching": batching, "d_corpus": corpus,
        "check": check, "loss_numerics": loss_numerics,
        "memory": mem,
        "e_compiled": compiled,
        "auto_layout": {**auto_report, "layout": auto_name,
                        "vs_fastest": by_key[f"kernel@{auto_name}"].median / by_key[f"kernel@{best_layout}"].median,
                        "loop_speedup": by_key["sgd-loop@bs1"].median / by_key[f"kernel@{auto_name}"].median},
    }
    del scorer, compiled_scorer, model, dense_v, paths, by_key
    gc.collect()
    return result


# ------------------------------------------------------------------------------------------------ report

LEGEND = """paths (each over all samples and both init-state passes; @layout = how samples are batched):
  kernel@L     SqsdScorer.score_batch: one fwd + one bwd per padded batch and init state, hooks + rank-r algebra
  plain@L      same peft model and batches: fwd, Σ per-sample mean NLL, bwd into LoRA A/B (no optimizer step)
  sgd-loop@bs1 peer-tool loop: per sample save LoRA, fwd, bwd, torch.optim.SGD step, dense ΔW = s(B'A'−B0A0)/η
               and dense ⟨ΔW, V⟩ per module, restore LoRA
  func@L       torch.func per-sample grads of the LoRA weights (variant printed), then factored projections
layouts: bsK = length-sorted batches of ≤ K; tok≤N = length-sorted, ≤ N padded tokens per batch;
  default = BatchingConfig(device=...).resolve() (deduplicated: shown under the name of the identical layout)"""


def fmt_s(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def render(r: dict) -> str:
    dev = r["device"].split(":")[0]
    tps = r["tokens_per_sample"]
    lines = [
        f"=== {r['model']}  ({r['device']}, {r['dtype']} (LoRA weights {r['lora_dtype']}), torch threads "
        f"{torch.get_num_threads()}, {r['repeats']} alternating repeats, medians)",
        f"model: {r['base_params'] / 1e6:.1f}M params; LoRA r={r['lora_rank']} on {r['lora_modules']} modules "
        f"({r['lora_params_per_state'] / 1e6:.2f}M params per init state); {r['n_passes']} init-state passes",
        f"data: {r['n_samples']} samples of {Path(r['data']).name}, max_length {r['max_length']}; tokens/sample "
        f"min {tps['min']} median {tps['median']:.0f} mean {tps['mean']:.0f} max {tps['max']} (total {tps['total']}, "
        f"response mean {tps['response_mean']:.0f}, {tps['truncated']} truncated)",
        f"memory: peak RSS {r['memory']['peak_rss_gib']:.2f} GiB (process so far)"
        + (f", cuda max allocated {r['memory']['cuda_max_allocated_gib']:.2f} GiB"
           if "cuda_max_allocated_gib" in r["memory"] else ""),
        "",
        f"{'path (both init states)':<24}{'median':>10}{'min':>10}{'samples/s':>11}{'tokens/s':>10}"
        + (f"{'CUDA peak+':>13}" if r["device"].startswith("cuda") else "") + "   runs (s)",
    ]
    for key, t in r["timings"].items():
        runs = " ".join(f"{x:.2f}" for x in t["runs_s"])
        cuda = f"{t['cuda_peak_extra_gib']:>9.2f} GiB" if "cuda_peak_extra_gib" in t else ""
        lines.append(f"{key:<24}{fmt_s(t['median_s']):>10}{fmt_s(t['min_s']):>10}{t['samples_per_s']:>11.2f}"
                     f"{t['tokens_per_s']:>10.0f}"
                     f"{cuda}   {runs}")
    lines.append("")
    for name, ratio in r["a_overhead_per_state"].items():
        per = r["a_per_state_s"][name]
        tag = " (default)" if name == r["default_layout"] else ""
        lines.append(f"(a) scoring / plain LoRA fwd+bwd, per init state, @{name}{tag}: {fmt_s(per['kernel'])} / "
                     f"{fmt_s(per['plain'])} = {ratio['median']:.2f} (fastest runs: {ratio['min']:.2f})  "
                     f"goal ≤ {GOAL_OVERHEAD}: {mark(ratio['median'] <= GOAL_OVERHEAD)}")
    goal_b = GOAL_LOOP_SPEEDUP.get(dev, 1.0)
    b, bb = r["b_loop_speedup_vs_default"], r["b_loop_speedup_vs_best"]
    lines.append(f"(b) speed-up over the batch-1 SGD-step loop (dense ΔW, lr {r['oracle_lr']:g}): "
                 f"kernel@{r['default_layout']} (default) {b['median']:.2f}x (fastest runs: {b['min']:.2f}x); "
                 f"kernel@{r['best_layout']} (fastest layout) {bb['median']:.2f}x  "
                 f"goal ≥ {goal_b:g}x on {dev}: {mark(b['median'] >= goal_b)}")
    c = r["c_func_speedup"]
    lines.append(f"(c) speed-up over torch.func [{r['func_variant']}, then factored projections], "
                 f"both @{r['func_layout']}: {c['median']:.2f}x (fastest runs: {c['min']:.2f}x)  "
                 f"goal ≥ {GOAL_FUNC_SPEEDUP:g}x: {mark(c['median'] >= GOAL_FUNC_SPEEDUP)}")
    for variant, err in r["func_failed_variants"].items():
        lines.append(f"    torch.func variant {variant} did not run: {err}")
    if r["func_unbatched_ops"]:
        lines.append(f"    vmap has no batching rule for {', '.join(r['func_unbatched_ops'])}: it loops over samples there")
    db = r["default_batching"]
    max_tok = "∞" if db["max_tokens"] >= 1 << 30 else str(db["max_tokens"])
    lines.append(f"(d) batching (kernel, both init states): layout auto (the default) -> {r['default_layout']}; "
                 f"layout fixed on {dev} = bs ≤ {db['max_batch_size']}, ≤ {max_tok} padded tokens -> "
                 f"{r['fixed_default_layout']}; fastest here: {r['best_layout']}")
    lines.append(f"    {'layout':<12}{'batches':>8}{'max bs':>7}{'padding':>9}{'median':>10}{'min':>10}{'samples/s':>11}"
                 f"{'tokens/s':>10}{'padded tok/s':>14}{'vs default':>12}")
    default_t = r["d_batching"][r["default_layout"]]["median_s"]
    for name, b in r["d_batching"].items():
        tag = ("  <- default (auto)" if name == r["default_layout"] else "") + (
            "  <- layout fixed" if name == r["fixed_default_layout"] else "")
        lines.append(f"    {name:<12}{b['n_batches']:>8}{b['max_bs']:>7}{b['padding_fraction']:>8.1%}"
                     f"{fmt_s(b['median_s']):>10}{fmt_s(b['min_s']):>10}{b['samples_per_s']:>11.2f}"
                     f"{b['tokens_per_s']:>10.0f}{b['padded_tokens'] / b['median_s']:>14.0f}"
                     f"{default_t / b['median_s']:>11.2f}x{tag}")
    corpus = r["d_corpus"]
    lines.append(f"    whole corpus ({corpus['n_samples']} samples, same batching; est. = padded tok/s × (1 − padding)): "
                 + ", ".join(
                     f"{name} pads {v['padding_fraction']:.1%} → {v['speedup_vs_default_est']:.2f}x"
                     for name, v in corpus["layouts"].items()))
    auto = r["auto_layout"]
    lines.append(f"    batching.layout auto picked {auto['chosen']} (calibration on {auto['samples']} samples: "
                 + ", ".join(f"{k} {v:.2f} s" for k, v in auto["seconds"].items())
                 + f") = layout {auto['layout']}: {auto['vs_fastest']:.2f} × the fastest layout's time "
                 f"(goal ≤ {GOAL_AUTO_LAYOUT:.2f}: {mark(auto['vs_fastest'] <= GOAL_AUTO_LAYOUT)}); "
                 f"{auto['loop_speedup']:.2f}x the batch-1 SGD loop (goal ≥ 1: {mark(auto['loop_speedup'] >= 1)})")
    e = r.get("e_compiled")
    if e is not None:
        added, ops = e["operators_added_per_module_and_pass"], e["operators_per_sample"]
        lines.append(f"(e) compiled reduction (scoring.compile: on) @{r['default_layout']}: (a) eager "
                     f"{e['a_overhead_eager']:.2f} -> compiled {e['a_overhead_compiled']:.2f} (goal ≤ "
                     f"{e['goal_overhead']}: {mark(e['a_overhead_compiled'] <= e['goal_overhead'])}); scoring "
                     f"{e['speedup_vs_eager']:.2f}x eager; first calls (compiling) {e['first_calls_compile_s']:.1f} s; "
                     "compiled / eager speed by layout: " + ", ".join(
                         f"{k} {v:.2f}x" for k, v in e["speedup_vs_eager_by_layout"].items()))
        lines.append(f"    operators per sample (one median sample, both passes): plain fwd+bwd {ops['plain']}, eager "
                     f"{ops['eager']}, compiled {ops['compiled']}; added per module and pass: eager "
                     f"{added['eager']:.1f}, compiled {added['compiled']:.1f} = cut {e['operators_cut']:.1f}x "
                     f"(goal ≥ {GOAL_OPS_CUT:g}x: {mark(e['operators_cut'] >= GOAL_OPS_CUT)})")
    c = r["check"]
    if "compiled_vs_eager" in c:
        lines.append(f"check compiled vs eager: max|Δ| {max(c['compiled_vs_eager'].values()):.1e} (tol 1e-6); "
                     f"compiled vs exact oracle {max(c['compiled_vs_oracle'].values()):.1e}")
    lines.append(
        f"check vs exact oracle (batch-1 real SGD step, LoRA weights in float64, lr 1e-7): max|Δ| danger "
        f"{c['kernel_vs_oracle']['danger_proj']:.1e}, safety {c['kernel_vs_oracle']['safety_proj']:.1e} "
        f"(raw rel {c['kernel_vs_oracle_raw_rel']:.1e}, loss {c['loss_vs_oracle']:.1e}); kernel vs torch.func "
        f"{max(c['kernel_vs_func'].values()):.1e}; kernel@{r['default_layout']} vs @{r['func_layout']} "
        f"{max(c['kernel_default_vs_func_layout'].values()):.1e}  (tol {c['tol']:g}: {'PASS' if c['passed'] else 'FAIL'})")
    lines.append(f"      timed peer loop (lr {r['oracle_lr']:g}, {r['lora_dtype']} weights) vs exact oracle: "
                 f"{max(c['peer_loop_vs_oracle'].values()):.1e} (its own first-order/rounding error)")
    ln = r["loss_numerics"]
    lines.append(f"loss numerics, longest sample ({ln['tokens']} tokens, vocab {ln['vocab']}): |loss − float64 loss| "
                 f"per_sample_mean_nll {ln['per_sample_mean_nll_abs_err']:.1e}, flattened cross-entropy (HF) "
                 f"{ln['flat_cross_entropy_abs_err']:.1e}")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny-llama,smollm2-135m", help="comma-separated ModelConfig.name_or_path")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--n-samples-tiny", type=int, default=16, help="samples for the tiny built-in models")
    ap.add_argument("--n-samples-small", type=int, default=4, help="samples for real models (SmolLM2: ~1.5-3 s "
                    "per sample and init state on 2 CPU cores; raise it on a GPU)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per path (rotating order), real models")
    ap.add_argument("--repeats-tiny", type=int, default=5, help="timed rounds per path for the tiny models (cheap)")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--corpus-limit", type=int, default=2000, help="records of --data read for the corpus padding "
                    "estimate in (d)")
    ap.add_argument("--batch-sizes", default="1,4,8", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--token-budget", type=int, default=None, help="padded tokens per batch; default 2 × max_length")
    ap.add_argument("--func-batch-size", type=int, default=8, help="padded batch size for (c)")
    ap.add_argument("--plain-at-func-layout", action="store_true",
                    help="also time plain fwd+bwd at the (c) layout, for a second (a) row (costs one more path)")
    ap.add_argument("--oracle-lr", type=float, default=1e-3, help="η of the batch-1 SGD loop (first order: small)")
    ap.add_argument("--threads", type=int, default=-1,
                    help="torch threads; 0 = torch's default; -1 (auto) = torch's default, or 1 when other processes "
                         "already load the machine (1-min load average > 0.5): a shared OpenMP team gives 10-50x outliers")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="(e): also time the kernel with the compiled reduction, count operators, compile time")
    ap.add_argument("--keep-compile-cache", action="store_true",
                    help="(e): use torch inductor's on-disk cache (default: a fresh one, so compiling is timed cold)")
    ap.add_argument("--out", default=None, help="write every number to this JSON file")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.repeats_tiny < 1:
        ap.error("--repeats and --repeats-tiny must be ≥ 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.keep_compile_cache:  # (e)'s first-call time is a cold compile, not a hit in an earlier run's cache
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sqsd-bench-inductor-")
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    threads_note = "torch default"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        threads_note = "--threads"
    elif args.threads < 0 and load_before > 0.5 and torch.get_num_threads() > 1:
        # An OpenMP team that shares its cores with other busy processes stalls at every barrier: on this
        # 2-core machine at load ~4, one SmolLM2 fwd+bwd took 50-150 s with 2 threads vs 6-8 s with 1.
        torch.set_num_threads(1)
        threads_note = f"auto: 1 because the load average was {load_before:.1f} before starting"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    header = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype,
        "python": platform.python_version(), "argv": sys.argv[1:], "cpu_count": cores,
        "threads_note": threads_note, "load_average_before": load_before,
    }
    started = time.perf_counter()
    print(f"device {header['device']}, {cores} CPU cores, torch {header['torch']}, {header['threads']} torch threads "
          f"({threads_note}), dtype {args.dtype}, load average before start {load_before:.2f}")
    print(LEGEND)
    results = []
    for model_name in [m for m in args.models.split(",") if m]:
        log(f"[{model_name}]")
        r = bench_model(model_name, args, device, log)
        results.append(r)
        print()
        print(render(r), flush=True)
    header["load_average_after"] = os.getloadavg()[0]
    header["wall_s"] = time.perf_counter() - started
    print(f"\nload average at the end {header['load_average_after']:.2f} (other processes share the cores: "
          "ratios are side by side, absolute times are not reproducible)")
    if args.out:
        Path(args.out).write_text(json.dumps({"header": header, "models": results}, indent=2, default=str))
    ok = all(r["check"]["passed"] for r in results)
    failed = [r["model"] for r in results if not r["check"]["passed"]]
    print(f"\ncorrectness: {'all PASS' if ok else 'FAIL on ' + ', '.join(failed)}; "
          f"wall time {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
