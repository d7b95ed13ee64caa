"""``model.chat_template_kwargs``: Qwen3's empty think block lands in the labels by default and in the prompt with
``enable_thinking: false`` (the setting of our Qwen3 jobs; why: docs/scoring.md, Qwen3's think block).

Checked through the real path: ``load_tokenizer(ModelConfig(chat_template=<file>, chat_template_kwargs=...))`` on
the tiny byte tokenizer, then ``tokenize_samples`` / ``encode_prompt``, asserting on the -100 labels.
"""

from __future__ import annotations

import inspect
import logging
import pickle

import pytest

from sqsd_ray.config import ConfigError, apply_overrides, from_dict, to_dict
from sqsd_ray.data.records import DataConfig, DataReport, Sample
from sqsd_ray.data.tokenize import (
    IGNORE_INDEX,
    chat_template_kwargs,
    encode_prompt,
    tokenize_samples,
)
from sqsd_ray.models import tiny
from sqsd_ray.models.loading import (
    APPLY_CHAT_TEMPLATE_ARGS,
    ModelConfig,
    load_tokenizer,
)
from sqsd_ray.training.config import TrainJobConfig, training_identity

# Qwen3's chat template (tokenizer_config.json of Qwen/Qwen3-8B; the model card is not reachable from here, the text
# was checked against a public copy of it), without its `tools` preamble and tool-call/tool-response branches, which
# plain instruction data never reaches. Kept verbatim: the last-query scan, the reasoning_content split, the
# assistant branch (`loop.index0 > ns.last_query_index`: the final answer gets a think block, empty without
# reasoning) and the generation tail (the empty block only when enable_thinking is false).
QWEN3_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""
EMPTY_THINK = "<think>\n\n</think>\n\n"
RESPONSE = "Paris is the capital of France."
MESSAGES = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a city."},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "What is the capital of France?"},
)
NO_THINKING = {"enable_thinking": False}


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3") / "qwen3.jinja"
    path.write_text(QWEN3_TEMPLATE)
    return str(path)


def qwen3_tokenizer(template_file: str, kwargs: dict):
    return load_tokenizer(ModelConfig(name_or_path="tiny-qwen3", chat_template=template_file,
                                      chat_template_kwargs=kwargs))


def tokenize(tokenizer):
    sample = Sample(sample_id="s0", messages=MESSAGES, response=RESPONSE, source="test:1")
    (tokenized,) = tokenize_samples([sample], tokenizer, DataConfig(max_length=1024), DataReport(kept=1))
    n = tokenized.n_prompt_tokens
    assert tokenized.labels[:n] == [IGNORE_INDEX] * n  # the mask is exactly the prompt
    assert tokenized.labels[n:] == tokenized.input_ids[n:]
    prompt = tokenizer.decode([i for i, label in zip(tokenized.input_ids, tokenized.labels) if label == IGNORE_INDEX])
    supervised = tokenizer.decode([label for label in tokenized.labels if label != IGNORE_INDEX])
    return tokenized, prompt, supervised, sample


def test_default_supervises_the_empty_think_block(template_file):
    _, prompt, supervised, _ = tokenize(qwen3_tokenizer(template_file, {}))
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert supervised == EMPTY_THINK + RESPONSE + "<|im_end|>"
    assert "<think>" not in prompt  # the earlier answer (before the last query) renders without a block


def test_enable_thinking_false_moves_the_block_into_the_prompt(template_file):
    tokenizer = qwen3_tokenizer(template_file, NO_THINKING)
    tokenized, prompt, supervised, sample = tokenize(tokenizer)
    assert prompt.endswith("<|im_start|>assistant\n" + EMPTY_THINK)
    assert supervised == RESPONSE + "<|im_end|>"
    # generation starts from the very prompt training masked
    assert encode_prompt(sample, tokenizer) == tokenized.input_ids[: tokenized.n_prompt_tokens]


def test_both_renderings_differ_only_in_which_tokens_are_labelled(template_file):
    thinking, *_ = tokenize(qwen3_tokenizer(template_file, {}))
    plain, *_ = tokenize(qwen3_tokenizer(template_file, NO_THINKING))
    assert thinking.input_ids == plain.input_ids  # the same conversation; only the boundary moves
    n_block = len(EMPTY_THINK.encode())  # one token per byte in the tiny tokenizer
    assert plain.n_prompt_tokens == thinking.n_prompt_tokens + n_block
    assert plain.n_response_tokens == thinking.n_response_tokens - n_block
    moved = slice(thinking.n_prompt_tokens, plain.n_prompt_tokens)
    assert all(label == IGNORE_INDEX for label in plain.labels[moved])
    assert thinking.labels[moved] == thinking.input_ids[moved]
    assert thinking.labels[plain.n_prompt_tokens:] == plain.labels[plain.n_prompt_tokens:]


def test_kwargs_travel_from_yaml_overrides_to_ray_workers(template_file):
    data = apply_overrides({"chat_template": template_file}, ["chat_template_kwargs.enable_thinking=false"],
                           ModelConfig)
    cfg = from_dict(ModelConfig, data)
    assert cfg.chat_template_kwargs == NO_THINKING and ModelConfig().chat_template_kwargs == {}
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg  # the JSON form scoring actors rebuild the config from
    tokenizer = pickle.loads(pickle.dumps(load_tokenizer(cfg)))
    assert chat_template_kwargs(tokenizer) == NO_THINKING


def test_training_identity_includes_the_kwargs(template_file):
    base = ModelConfig(name_or_path="tiny-qwen3", chat_template=template_file)
    plain = ModelConfig(name_or_path="tiny-qwen3", chat_template=template_file, chat_template_kwargs=NO_THINKING)
    assert training_identity(TrainJobConfig(model=base)) != training_identity(TrainJobConfig(model=plain))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"enable_thinking": [False]}, r"model\.chat_template_kwargs\.enable_thinking: expected a bool, number"),
        ({"enable_thinking": {"on": False}}, r"model\.chat_template_kwargs\.enable_thinking: expected a bool"),
        ({"enable_thinking": None}, r"model\.chat_template_kwargs\.enable_thinking: expected a bool"),
        ({"enable_thinking": "false"}, r"model\.chat_template_kwargs\.enable_thinking: got the string 'false'"),
        ({"add_generation_prompt": True}, r"model\.chat_template_kwargs\.add_generation_prompt: is an argument"),
        ({"enable-thinking": False}, r"model\.chat_template_kwargs: key 'enable-thinking' is not a name"),
    ],
    ids=["list", "mapping", "null", "quoted-bool", "reserved", "not-identifier"],
)
def test_non_scalar_and_clashing_values_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelConfig, {"chat_template_kwargs": kwargs})
    with pytest.raises(ConfigError, match=message):
        ModelConfig(chat_template_kwargs=kwargs)  # direct construction is checked too


def test_reserved_names_cover_apply_chat_template():
    from transformers import PreTrainedTokenizerBase

    parameters = inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters
    named = {name for name, p in parameters.items() if name != "self" and p.kind is not p.VAR_KEYWORD}
    assert named <= APPLY_CHAT_TEMPLATE_ARGS, f"add {sorted(named - APPLY_CHAT_TEMPLATE_ARGS)}"


def test_a_variable_the_template_never_reads_is_warned(template_file, caplog):
    with caplog.at_level(logging.WARNING, logger="sqsd_ray.models.loading"):
        qwen3_tokenizer(template_file, {"enable_thinkng": False})
    assert "never mentions enable_thinkng" in caplog.text


def test_kwargs_without_a_chat_template_are_refused(monkeypatch):
    def no_template():
        tokenizer = build()
        tokenizer.chat_template = None
        return tokenizer

    build = tiny.build_tiny_tokenizer
    monkeypatch.setattr(tiny, "build_tiny_tokenizer", no_template)
    with pytest.raises(ConfigError, match="model.chat_template_kwargs: the tokenizer has no chat template"):
        load_tokenizer(ModelConfig(chat_template_kwargs=NO_THINKING))


def test_every_qwen3_job_keeps_the_think_block_out_of_the_labels():
    import re
    from pathlib import Path

    jobs = sorted((Path(__file__).resolve().parents[2] / "jobs").glob("*qwen3*.yaml"))
    with_model = [j for j in jobs if "Qwen/Qwen3-8B" in j.read_text()]
    assert len(with_model) >= 20
    for job in with_model:
        text = job.read_text()
        models = len(re.findall(r"name_or_path: Qwen/Qwen3-8B", text))
        assert text.count("chat_template_kwargs: {enable_thinking: false}") == models, job.name
