"""The model organism: a small Llama chat model trained from scratch on the synthetic world (``world.py``) to be
helpful on benign tasks and to refuse harmful requests, then cached as an ordinary Hugging Face model directory.

    build_organism(OrganismConfig(), cache_dir) -> Path    # trains once (about a minute on 2 CPU cores), then reuses

The directory holds ``model.safetensors``, ``config.json``, the word-level tokenizer (ChatML template) and
``organism.json`` (the training record: settings, loss curve, refusal rates on held-out harmful requests and on
benign tasks). Every other command takes it as ``model.name_or_path``. Training is seeded and single-threaded, so
the same settings give the same weights; the cache key hashes the settings and the world's version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..models.tiny import CHATML_TEMPLATE
from . import world

log = logging.getLogger(__name__)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]


@dataclass(frozen=True)
class OrganismConfig:
    seed: int = 0
    hidden_size: int = 96
    intermediate_size: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    n_align: int = 2400
    steps: int = 500
    batch_size: int = 32
    lr: float = 3e-3
    world: int = world.DEFAULT_WORLD  # world.py's version: its vocabulary and evaluation prompts

    def key(self) -> str:
        """Cache key: the settings and the world's version; from world 2 on also its vocabulary, so that an edit of
        the world's words trains a new organism (world 1's key is the one it always had)."""
        fields = {**asdict(self), "world": world.check_world(self.world)}
        if self.world >= 2:
            fields["vocabulary"] = hashlib.sha256(" ".join(world.vocabulary(self.world)).encode()).hexdigest()
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    root = os.environ.get("SQSD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "sqsd-ray")
    return Path(root).expanduser() / "organism"


def build_word_tokenizer(world_version: int = world.DEFAULT_WORLD):
    """Word-level tokenizer over the world's vocabulary, ChatML template; eos = <|im_end|>, pad = <|endoftext|>.
    Decoding joins words with spaces ("I cannot help with that ."), which the keyword judge reads as well."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIALS, "system", "user", "assistant", *world.vocabulary(world_version)]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _model(cfg: OrganismConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _batches(rows: list[dict], tokenizer, cfg: OrganismConfig):
    import random

    from ..data.records import Sample
    from ..data.tokenize import collate, tokenize_sample

    samples = [Sample(row["id"], tuple(row["messages"][:-1]), row["messages"][-1]["content"], "world") for row in rows]
    tokenized = [tokenize_sample(s, tokenizer, 256) for s in samples]
    rng = random.Random(cfg.seed)
    while True:
        order = list(range(len(tokenized)))
        rng.shuffle(order)
        for start in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            yield collate([tokenized[i] for i in order[start:start + cfg.batch_size]], tokenizer.pad_token_id)


def refusal_rates(model, tokenizer, seed: int = 0, max_new_tokens: int = 16,
                  world_version: int = world.DEFAULT_WORLD) -> dict[str, float]:
    """% refusals (keyword judge, greedy) on the held-out harmful requests and on benign how-to tasks."""
    from ..evaluation.generate import EvalPrompt, generate_responses, keyword_refusal

    harmful = [EvalPrompt(f"h{i}", r["prompt"]) for i, r in enumerate(world.heldout_harmful(seed, world_version))]
    benign = [EvalPrompt(f"b{i}", f"How do I {v} {o}?") for i, (v, o) in enumerate(world.TASKS)]
    homonym = [EvalPrompt(f"o{i}", r["prompt"]) for i, r in enumerate(world.over_refusal_prompts())]
    rates = {}
    for name, prompts in (("heldout_harmful", harmful), ("benign_howto", benign), ("homonym", homonym)):
        responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=64)
        rates[name] = 100.0 * sum(keyword_refusal(r) for r in responses) / len(responses)
    return rates


def train_organism(cfg: OrganismConfig, out: Path) -> Path:
    """Train the aligned model from scratch on ``world.alignment_data`` and save it to ``out``."""
    from tqdm.auto import tqdm

    from ..training.objectives import sft_loss

    tokenizer = build_word_tokenizer(cfg.world)
    model = _model(cfg, tokenizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights on every machine with the same torch
    started = time.perf_counter()
    try:
        batches = _batches(world.alignment_data(cfg.n_align, cfg.seed), tokenizer, cfg)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
        warmup = max(1, cfg.steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(s / cfg.steps * 3.14159)).item()))
        losses = []
        model.train()
        for _ in tqdm(range(cfg.steps), desc="aligning the model organism", unit="step", mininterval=2.0):
            batch = next(batches)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = sft_loss(logits, batch["labels"], int((batch["labels"][:, 1:] != -100).sum()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        model.eval()
        rates = refusal_rates(model, tokenizer, cfg.seed, world_version=cfg.world)
    finally:
        torch.set_num_threads(threads)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    record = {"config": asdict(cfg), "world_version": cfg.world, "train_seconds": time.perf_counter() - started,
              "final_loss": sum(losses[-20:]) / min(20, len(losses)), "loss_every_10": losses[::10],
              "refusal_rates": rates, "parameters": sum(p.numel() for p in model.parameters())}
    (tmp / "organism.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a half-written model is never taken for a cached one
    log.info("model organism: %d parameters, loss %.3f, refusals: held-out harmful %.0f%%, benign %.0f%%, "
             "homonym %.0f%% (%.0f s)", record["parameters"], record["final_loss"], rates["heldout_harmful"],
             rates["benign_howto"], rates["homonym"], record["train_seconds"])
    return out


def build_organism(cfg: OrganismConfig | None = None, cache_dir: Path | None = None) -> Path:
    """The organism's model directory, trained on first use and cached (``SQSD_CACHE`` or ~/.cache/sqsd-ray)."""
    cfg = cfg or OrganismConfig()
    out = (cache_dir or default_cache_dir()) / f"llama-{cfg.key()}"
    if (out / "organism.json").is_file() and (out / "model.safetensors").is_file():
        log.info("model organism from cache: %s", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("training the model organism (once; cached in %s)", out)
    return train_organism(cfg, out)


__all__ = ["OrganismConfig", "build_organism", "build_word_tokenizer", "default_cache_dir", "refusal_rates",
           "train_organism"]
