"""Tiny chat models built from configs, with a tokenizer built locally: no downloads, seeded, for tests.

The tokenizer is byte-level BPE with no merges (one token per byte, 256 + specials), so it is exact and
needs no training data; its chat template is ChatML, the format Qwen uses.
"""

from __future__ import annotations

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_ARCHS = ("llama", "qwen3")


def build_tiny_tokenizer():
    """Byte-level tokenizer (vocab 259) with a ChatML chat template; eos = <|im_end|>, pad = <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(
    arch: str = "llama",
    seed: int = 0,
    vocab_size: int = 259 + 0,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 2048,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised Llama or Qwen3 causal LM (two layers by default), seeded and deterministic."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if arch not in TINY_ARCHS:
        raise ValueError(f"tiny arch must be one of {TINY_ARCHS}, got {arch!r}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=256 + SPECIAL_TOKENS.index("<|endoftext|>"),
        eos_token_id=256 + SPECIAL_TOKENS.index("<|im_end|>"),
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
        model_cls = LlamaForCausalLM
    else:
        config = Qwen3Config(head_dim=hidden_size // num_attention_heads, **common)
        model_cls = Qwen3ForCausalLM
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config.pad_token_id = config.pad_token_id
    return model.to(dtype).eval()
