"""The CLI's anticipated failures: one ``error: ...`` line on stderr naming the key or file and what to do,
exit code 2; a traceback only with ``-v``. Ctrl-C exits 130 with its message."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from sqsd_ray import cli
from sqsd_ray.config import ConfigError
from sqsd_ray.models import loading
from sqsd_ray.models.loading import ModelConfig, load_model, load_tokenizer
from sqsd_ray.models.lora import (
    LoraSettings,
    load_adapter_state,
    lora_module_shapes,
    lora_shapes_without_weights,
    save_adapter,
)
from tests.conftest import save_random_directions

MISSING_ID = "nobody-xyz/not-a-model"


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    """The whole of stderr, which must be one ``error: ...`` line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_directions(tmp_path_factory) -> dict[str, Path]:
    return save_random_directions(tmp_path_factory.mktemp("directions"), "tiny-llama")


@pytest.fixture
def score_args(tmp_path, monkeypatch, tiny_directions) -> list[str]:
    """A runnable in-process score job on tiny-llama, in a scratch working directory."""
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"prompt": "Name a colour.", "response": "Blue."}) + "\n")
    return ["score", "--set", f"directions.danger={tiny_directions['danger']}",
            "--set", f"directions.safety={tiny_directions['safety']}", "--set", f"data.path={corpus}",
            "--set", f"output.dir={tmp_path / 'out'}", "--set", "ray.enabled=false"]


@pytest.fixture
def offline(monkeypatch, tmp_path) -> Path:
    """HF_HUB_OFFLINE=1 with an empty HF cache; huggingface_hub read both at import, so they are patched too."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def online(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


# ------------------------------------------------------------------------------------------ config values


def test_invalid_yaml_in_override_is_one_line(capsys):
    code, err = run_cli(capsys, "score", "--set", "data.max_length=[1,")
    line = error_line(err)
    assert code == 2
    assert "override 'data.max_length=[1,'" in line and "not valid YAML" in line and "quote" in line


@pytest.mark.parametrize("override, key", [
    ("init_states.danger.alpha=.nan", "init_states.danger.alpha"),
    ("init_states.safety.alpha=-.inf", "init_states.safety.alpha"),
    ("ray.num_cpus_per_actor=nan", "ray.num_cpus_per_actor"),  # float | None, and YAML's plain string 'nan'
    ("fidelity.eps=[0.01, .nan]", "fidelity.eps[1]"),
])
def test_non_finite_float_names_the_key(capsys, tmp_path, monkeypatch, override, key):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "score", "--set", "directions.danger=d.safetensors",
                        "--set", "directions.safety=s.safetensors", "--set", override)
    assert code == 2
    assert error_line(err).startswith(f"error: {key}: must be a finite number")


def test_nan_in_config_file_names_the_key(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "job.yaml"
    job.write_text("directions: {danger: d.safetensors, safety: s.safetensors}\n"
                   "init_states:\n  danger: {kind: direction, alpha: .nan}\n")
    code, err = run_cli(capsys, "score", "--config", str(job))
    assert code == 2
    assert error_line(err) == "error: init_states.danger.alpha: must be a finite number, got nan"


# ------------------------------------------------------------------------------------------ model sources


@pytest.mark.parametrize("path", ["{tmp}/nope/model", "./models/x", "runs/foo/bar/model", "~/no-such-sqsd-model"])
def test_missing_local_model_dir_is_named(capsys, score_args, tmp_path, path):
    path = path.format(tmp=tmp_path)
    code, err = run_cli(capsys, *score_args, "--set", f"model.name_or_path={path}")
    line = error_line(err)
    assert code == 2
    assert line.startswith("error: model.name_or_path: local model directory ") and "does not exist" in line
    assert str(Path(path).expanduser()) in line and "Repo id" not in line


def test_missing_local_tokenizer_dir_is_named():
    with pytest.raises(ConfigError, match=r"^model\.tokenizer: local tokenizer directory tok/nope .*does not exist"):
        load_tokenizer(ModelConfig(tokenizer="./tok/nope"))


@pytest.mark.parametrize("kwargs, message", [
    ({"name_or_path": "{tmp}/config.json"}, r"model\.name_or_path: .*config\.json is a file; give the model directory"),
    ({"name_or_path": "{tmp}", "gguf_file": "m.gguf"}, r"model\.gguf_file: .* holds no file 'm\.gguf'"),
    ({"name_or_path": "a b/c"}, r"model\.name_or_path: 'a b/c' is neither an existing local path nor a valid hub id"),
])
def test_unusable_model_source_is_named(tmp_path, kwargs, message):
    (tmp_path / "config.json").write_text("{}")
    cfg = ModelConfig(**{k: v.format(tmp=tmp_path) for k, v in kwargs.items()})
    with pytest.raises(ConfigError, match=message):
        loading.resolve_model_source(cfg)


def test_hub_id_missing_from_cache_fails_at_once_offline(capsys, score_args, offline):
    started = time.monotonic()
    code, err = run_cli(capsys, *score_args, "--set", f"model.name_or_path={MISSING_ID}")
    line = error_line(err)
    assert code == 2 and time.monotonic() - started < 5
    assert f"model.name_or_path: hub model '{MISSING_ID}'" in line
    assert "not in the local HF cache" in line and "offline" in line and str(offline) in line


def _fake_cache_entry(cache: Path, repo_id: str) -> Path:
    """A tiny-llama saved where the HF cache keeps ``repo_id`` (refs/main -> snapshots/<commit>)."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    load_model(ModelConfig(name_or_path="tiny-llama")).save_pretrained(repo / "snapshots" / commit)
    return repo


def test_cached_hub_id_resolves_offline(offline):
    _fake_cache_entry(offline, "sqsd-test/tiny-llama")
    cfg = ModelConfig(name_or_path="sqsd-test/tiny-llama")
    shapes = lora_shapes_without_weights(cfg, LoraSettings())
    assert shapes == lora_module_shapes(load_model(cfg), LoraSettings())


def _connection_refused():
    from huggingface_hub.utils import httpx

    return httpx.ConnectError("[Errno -2] Name or service not known")


@pytest.mark.parametrize("error", [
    lambda: OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
                    "the cached files.\nCheck your internet connection or see how to run the library in offline mode"),
    _connection_refused,
])
@pytest.mark.parametrize("entry", ["AutoModelForCausalLM", "AutoTokenizer"])
def test_hub_failure_online_names_the_id(monkeypatch, online, error, entry):
    import transformers

    def fail(*args, **kwargs):
        raise error()

    monkeypatch.setattr(getattr(transformers, entry), "from_pretrained", fail)
    load = load_model if entry == "AutoModelForCausalLM" else load_tokenizer
    with pytest.raises(ConfigError) as info:
        load(ModelConfig(name_or_path=MISSING_ID))
    message = str(info.value)
    assert message.startswith(f"model.name_or_path: could not load '{MISSING_ID}'") and "\n" not in message
    assert "HF_HUB_OFFLINE=1" in message and "local directory" in message


# ------------------------------------------------------------------------------------------ shapes, no weights


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_shapes_without_weights_match_the_loaded_model(name):
    cfg, lora = ModelConfig(name_or_path=name), LoraSettings()
    assert lora_shapes_without_weights(cfg, lora) == lora_module_shapes(load_model(cfg), lora)


def test_shapes_without_weights_of_a_saved_model(tmp_path, monkeypatch):
    import transformers

    load_model(ModelConfig(name_or_path="tiny-qwen3")).save_pretrained(tmp_path / "m")
    cfg, lora = ModelConfig(name_or_path=str(tmp_path / "m")), LoraSettings(target_modules=["q_proj", "down_proj"])
    expected = lora_module_shapes(load_model(cfg), lora)

    def no_weights(*args, **kwargs):
        raise AssertionError("lora_shapes_without_weights loaded the weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    assert lora_shapes_without_weights(cfg, lora) == expected
    with pytest.raises(ConfigError, match="local model directory .* does not exist"):
        lora_shapes_without_weights(ModelConfig(name_or_path=str(tmp_path / "gone")), lora)


def test_shapes_without_weights_of_the_smollm2_gguf(monkeypatch):
    if importlib.util.find_spec(loading.SMOLLM2_PACKAGE) is None:  # found, not imported: it needs the llm package
        pytest.skip(f"{loading.SMOLLM2_PACKAGE} is not installed")
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("lora_shapes_without_weights loaded the weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    started = time.monotonic()
    shapes = lora_shapes_without_weights(ModelConfig(name_or_path=loading.SMOLLM2_ALIAS), LoraSettings())
    assert time.monotonic() - started < 20  # about 4 s on 2 CPU cores: the GGUF header, no tensors
    # SmolLM2-135M: 30 blocks, hidden 576, 3 kv heads of 64, MLP 1536
    assert len(shapes) == 30 * 7
    layer = "model.layers.29."
    assert shapes[layer + "self_attn.q_proj"] == (576, 576) and shapes[layer + "self_attn.k_proj"] == (192, 576)
    assert shapes[layer + "mlp.down_proj"] == (576, 1536)


# ------------------------------------------------------------------------------------------ damaged files


def test_truncated_direction_file_is_named(capsys, score_args, tiny_directions, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(tiny_directions["danger"].read_bytes()[:100])
    code, err = run_cli(capsys, *score_args, "--set", f"directions.danger={bad}")
    line = error_line(err)
    assert code == 2
    assert line.startswith(f"error: direction file {bad} is not a readable safetensors file (")
    assert "rebuild it" in line and "directions.danger" in line


def test_direction_file_with_a_damaged_header_is_named(tmp_path):
    import torch
    from safetensors.torch import save_file

    from sqsd_ray.models.directions import FORMAT, Direction

    path = tmp_path / "v.safetensors"
    save_file({"m.A": torch.zeros(1, 2)}, str(path), metadata={"format": FORMAT, "metadata": "{"})
    with pytest.raises(ValueError, match=rf"^direction file {path} has a damaged header .*rebuild it"):
        Direction.load(path)


def test_truncated_adapter_weights_are_named(tmp_path):
    from sqsd_ray.models.directions import random_direction

    shapes = lora_module_shapes(load_model(ModelConfig(name_or_path="tiny-llama")), LoraSettings())
    direction = random_direction(shapes, rank=8)
    factors = {name: (f.A, f.B) for name, f in direction.modules.items()}
    weights = save_adapter(factors, LoraSettings(), tmp_path / "adapter") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"^adapter weights file {weights} is not a readable safetensors file"):
        load_adapter_state(tmp_path / "adapter")


def test_adapter_config_that_is_not_json_is_named(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON .*re-save the adapter"):
        load_adapter_state(tmp_path)


# ------------------------------------------------------------------------------------------ main itself


def _failing_score(monkeypatch, error: BaseException) -> None:
    def cmd_score(args):
        raise error

    monkeypatch.setattr(cli, "cmd_score", cmd_score)


@pytest.mark.parametrize("error", [
    PermissionError(13, "Permission denied", "/runs/x/scores.parquet"),
    IsADirectoryError(21, "Is a directory", "/runs/x/scores.parquet"),
    NotADirectoryError(20, "Not a directory", "/runs/x/scores.parquet"),
])
def test_os_errors_naming_a_path_are_one_line(capsys, monkeypatch, error):
    _failing_score(monkeypatch, error)
    code, err = run_cli(capsys, "score")
    assert code == 2
    assert error_line(err).endswith("'/runs/x/scores.parquet'")


def test_verbose_adds_the_traceback_and_keeps_the_message_whole(capsys, monkeypatch):
    _failing_score(monkeypatch, ValueError("record 7 of corpus.jsonl: no response\nfix the record or skip it"))
    code, err = run_cli(capsys, "-v", "score")
    assert code == 2
    assert err.startswith("Traceback (most recent call last):")
    assert err.endswith("error: record 7 of corpus.jsonl: no response\nfix the record or skip it\n")


def test_hub_errors_are_not_anticipated(monkeypatch):
    from huggingface_hub.errors import HFValidationError

    _failing_score(monkeypatch, HFValidationError("Repo id must be in the form 'repo_name' or 'namespace/repo_name'"))
    with pytest.raises(HFValidationError):
        cli.main(["score"])


@pytest.mark.parametrize("error, message", [
    (KeyboardInterrupt("interrupted: 3 of 10 samples kept in runs/x; rerun the same command to resume"),
     "interrupted: 3 of 10 samples kept in runs/x; rerun the same command to resume"),
    (KeyboardInterrupt(), "interrupted"),
])
def test_ctrl_c_prints_its_message_and_exits_130(capsys, monkeypatch, error, message):
    _failing_score(monkeypatch, error)
    try:
        code = cli.main(["score"])
    except KeyboardInterrupt:  # let through, it would stop the whole pytest session
        pytest.fail("KeyboardInterrupt escaped cli.main")
    assert code == 130
    assert capsys.readouterr().err == message + "\n"


@pytest.mark.parametrize("problems", [["part parts/00001.parquet: checksum differs", "run.json is missing"], []])
def test_verify_prints_each_problem(capsys, monkeypatch, problems):
    calls = []

    def verify_run(run_dir):
        calls.append(run_dir)
        return problems

    monkeypatch.setattr("sqsd_ray.scoring.store.verify_run", verify_run, raising=False)
    code = cli.main(["verify", "runs/x"])
    out, err = capsys.readouterr()
    assert calls == [Path("runs/x")]
    if problems:
        assert (code, out) == (1, "")
        assert err.splitlines() == [f"error: {p}" for p in problems]
    else:
        assert (code, out, err) == (0, "ok: runs/x verified\n", "")


def test_break_lock_sets_the_override():
    args = cli.build_parser().parse_args(["score", "--set", "data.max_length=64", "--break-lock"])
    assert args.overrides == ["data.max_length=64", "output.break_lock=true"]
    assert cli.build_parser().parse_args(["score"]).overrides == []
