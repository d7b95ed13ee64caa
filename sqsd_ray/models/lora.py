"""LoRA adapters in peft's terms: attach them, read and write their factors, load saved adapter files.

SQSD works on LoRA-augmented linear modules (paper Eq. 1–2): for a module with base weight
W ∈ R^{d_out×d_in}, peft computes ``h = W x + s·B(A x)`` with A ∈ R^{r×d_in}, B ∈ R^{d_out×r} and
``s = α/r`` (``α/√r`` with rsLoRA), so the module's drift is ΔW = s·B A (Eq. 2). Directions (Eq. 5, 7–8)
and initialisation states are expressed in exactly these factors; this module is the one place that
knows how peft stores them.

Conventions shared with ``models.directions``, ``scoring.hooks`` and ``scoring.scorer``:

* **Canonical module names** are module paths in the *base* model, e.g. ``model.layers.0.self_attn.q_proj``.
  peft's wrapper prefix ``base_model.model.`` and the ``.base_layer`` / ``.lora_A.<adapter>`` suffixes are
  stripped everywhere (live models and saved adapter files alike).
* **Shapes** are ``(d_out, d_in)`` = ``nn.Linear.weight.shape``; A is ``r×d_in`` and B is ``d_out×r``.
* **Scaling** is per module (peft's ``rank_pattern``/``alpha_pattern`` make it so); ``LoraSettings.scaling``
  is the global one.

peft is imported inside the functions that need it, so config parsing and ``--help`` stay fast.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..config import ConfigError, help_field, one_line
from .loading import (
    ModelConfig,
    base_model_of,
    load_errors,
    load_model,
    pretrained_kwargs,
    resolve_model_source,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from peft import PeftModel


DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


PEFT_PREFIX = "base_model.model."


FactorDict = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LoraSettings:
    """The LoRA adapter the scorer differentiates through (paper App. A / §5.1: r=8, α=16, all 7 modules)."""

    r: int = help_field(8, help="LoRA rank r")
    alpha: float = help_field(16.0, help="LoRA alpha; peft scaling s = alpha/r (alpha/sqrt(r) with rslora)")
    target_modules: list[str] = help_field(
        DEFAULT_TARGET_MODULES,
        help="names (or dotted name suffixes) of the nn.Linear modules that get a LoRA adapter",
    )
    dropout: float = help_field(0.0, help="LoRA dropout; only active in train mode, the scorer runs in eval")
    use_rslora: bool = help_field(False, help="rank-stabilised LoRA: scaling alpha/sqrt(r) instead of alpha/r")

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora.r: must be a positive integer (paper: 8), got {self.r!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"lora.alpha: must be a positive finite number (paper: 16), got {self.alpha!r}")
        if isinstance(self.target_modules, str):
            raise ConfigError(
                f"lora.target_modules: must be a list of module names, e.g. [q_proj, v_proj], "
                f"got the string {self.target_modules!r}"
            )
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError(
                f"lora.target_modules: must be a non-empty list of non-empty names, e.g. "
                f"{DEFAULT_TARGET_MODULES}, got {self.target_modules!r}"
            )
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ConfigError(f"lora.target_modules: remove the duplicates in {self.target_modules!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout!r} (use 0.0 to disable)")

    @property
    def scaling(self) -> float:
        """peft's s: α/r, or α/√r with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def peft_config(self):
        """The equivalent ``peft.LoraConfig`` (plain LoRA, no bias, causal-LM task)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            lora_dropout=self.dropout,
            use_rslora=self.use_rslora,
            bias="none",
            task_type="CAUSAL_LM",
        )


@dataclass
class AdapterInfo:
    """What ``load_adapter_state`` learned from ``adapter_config.json`` (plus per-module facts from the weights)."""

    path: str
    lora: LoraSettings  # global r / alpha / targets as configured
    module_scalings: dict[str, float]  # canonical name -> s_m (differs from lora.scaling under alpha/rank_pattern)
    module_ranks: dict[str, int]  # canonical name -> r_m (from the tensors, checked against rank_pattern)
    base_model_name_or_path: str | None = None
    peft_version: str | None = None

    @property
    def scaling(self) -> float:
        """The global scaling α/r; per-module values are in ``module_scalings``."""
        return self.lora.scaling

    @property
    def uniform_scaling(self) -> bool:
        return all(s == self.lora.scaling for s in self.module_scalings.values())


def lora_shapes_without_weights(cfg: ModelConfig, lora: LoraSettings) -> dict[str, tuple[int, int]]:
    """``lora_module_shapes(load_model(cfg), lora)`` without reading the weights, so a driver can check
    directions against the model before any worker loads it. A pretrained model is built from its config on
    the meta device (a GGUF file's header gives the config); a tiny built-in one is simply built."""
    source = resolve_model_source(cfg)
    if source.kind == "tiny":
        return lora_module_shapes(load_model(cfg), lora)

    from transformers import AutoConfig, AutoModelForCausalLM

    with load_errors("model.name_or_path", source.path):
        config = AutoConfig.from_pretrained(source.path, **pretrained_kwargs(cfg, source))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    return lora_module_shapes(model, lora)


def canonical_module_name(name: str) -> str:
    """``base_model.model.model.layers.0.mlp.up_proj`` -> ``model.layers.0.mlp.up_proj`` (base-model path)."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _is_lora_layer(module: nn.Module) -> bool:
    # peft's LoraLayer (duck-typed so plain models need no peft import).
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and hasattr(module, "get_base_layer")


def _matches_target(name: str, target: str) -> bool:
    # Same rule as peft's check_target_module_exists for a list of targets: exact or dotted suffix.
    return name == target or name.endswith("." + target)


def _linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Canonical name -> the base nn.Linear, looking through peft LoRA wrappers and skipping their insides."""
    found: dict[str, nn.Linear] = {}
    lora_prefixes: list[str] = []
    for name, module in base_model_of(model).named_modules():
        if any(name.startswith(p) for p in lora_prefixes):
            continue  # base_layer / lora_A.<adapter> / lora_B.<adapter> of a wrapped module
        if _is_lora_layer(module):
            lora_prefixes.append(name + ".")
            base = module.get_base_layer()
            if isinstance(base, nn.Linear):
                found[name] = base
        elif isinstance(module, nn.Linear):
            found[name] = module
    return found


def lora_module_shapes(model: nn.Module, lora: LoraSettings) -> dict[str, tuple[int, int]]:
    """Canonical name -> (d_out, d_in) of every nn.Linear targeted by ``lora.target_modules``.

    Works on a plain HF model and on a PeftModel (same names either way). Raises ``ConfigError`` naming the
    targets that match no nn.Linear, since peft silently skips a target when another one matched.
    """
    linears = _linear_modules(model)
    shapes: dict[str, tuple[int, int]] = {}
    matched: set[str] = set()
    for name, linear in linears.items():
        hits = [t for t in lora.target_modules if _matches_target(name, t)]
        if hits:
            matched.update(hits)
            d_out, d_in = linear.weight.shape  # nn.Linear stores (out_features, in_features)
            shapes[name] = (int(d_out), int(d_in))
    missing = [t for t in lora.target_modules if t not in matched]
    if missing:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ConfigError(
            f"lora.target_modules: {missing} match no nn.Linear in {type(base_model_of(model)).__name__}; "
            f"Linear module names available: {leaf_names}"
        )
    return shapes


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    # peft 0.21 calls transformers 5's deprecated `is_gradient_checkpointing`; the FutureWarning is noise here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def apply_lora(model: nn.Module, lora: LoraSettings, adapter_name: str = "default") -> PeftModel:
    """Wrap ``model`` with a fresh peft LoRA adapter (B = 0, A Kaiming-uniform: peft's default init).

    The model is modified in place (peft swaps its Linear modules); deep-copy it first to keep θ0 intact.
    The train/eval mode of ``model`` is kept: ``get_peft_model`` returns a model in train mode, which would
    silently switch LoRA dropout on.
    """
    from peft import get_peft_model

    lora_module_shapes(model, lora)  # fail early, naming any target that matches nothing
    was_training = model.training
    with _quiet_peft():
        peft_model = get_peft_model(model, lora.peft_config(), adapter_name=adapter_name)
    peft_model.train(was_training)
    return peft_model


def add_adapter(peft_model: PeftModel, lora: LoraSettings, adapter_name: str) -> PeftModel:
    """Add a second LoRA adapter (fresh init) to ``peft_model``; the active adapter is unchanged."""
    if adapter_name in peft_model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists; pick another adapter_name")
    lora_module_shapes(peft_model, lora)
    was_training = peft_model.training
    with _quiet_peft():
        peft_model.add_adapter(adapter_name, lora.peft_config())
    peft_model.train(was_training)
    return peft_model


def lora_layers(peft_model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    """Canonical name -> peft LoraLayer holding ``adapter_name``."""
    layers: dict[str, nn.Module] = {}
    available: set[str] = set()
    for name, module in base_model_of(peft_model).named_modules():
        if _is_lora_layer(module):
            available.update(module.lora_A.keys())
            if adapter_name in module.lora_A:
                layers[name] = module
    if not layers:
        raise ValueError(
            f"no LoRA module holds adapter {adapter_name!r}; adapters present: {sorted(available) or 'none'} "
            f"(attach one with apply_lora)"
        )
    return layers


def get_lora_factors(peft_model: nn.Module, adapter_name: str = "default") -> FactorDict:
    """Canonical name -> (A: r×d_in, B: d_out×r), detached copies of the adapter's current weights."""
    return {
        name: (
            layer.lora_A[adapter_name].weight.detach().clone(),
            layer.lora_B[adapter_name].weight.detach().clone(),
        )
        for name, layer in lora_layers(peft_model, adapter_name).items()
    }


def get_lora_scalings(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """Canonical name -> peft's scaling s_m of ``adapter_name`` (α/r unless rank/alpha patterns were used)."""
    return {name: float(layer.scaling[adapter_name]) for name, layer in lora_layers(peft_model, adapter_name).items()}


def set_lora_factors(
    peft_model: nn.Module, factors: FactorDict, adapter_name: str = "default", strict: bool = True
) -> None:
    """Copy (A, B) factors into the adapter's ``lora_A`` / ``lora_B`` weights (cast to their dtype/device).

    ``strict``: every LoRA module of the adapter must get factors (a partial initialisation state is
    almost always a mistake). Any factor for a module the model lacks, or of the wrong shape, is an error
    naming the module; nothing is written unless everything checks.
    """
    layers = lora_layers(peft_model, adapter_name)
    unknown = sorted(set(factors) - set(layers))
    if unknown:
        raise ValueError(
            f"set_lora_factors: module {unknown[0]!r} has no LoRA adapter {adapter_name!r} in the model"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
        )
    if strict:
        uncovered = sorted(set(layers) - set(factors))
        if uncovered:
            raise ValueError(
                f"set_lora_factors: no factors for LoRA module {uncovered[0]!r}"
                + (f" (and {len(uncovered) - 1} more)" if len(uncovered) > 1 else "")
                + "; pass strict=False to leave such modules unchanged"
            )
    for name, (a, b) in factors.items():
        weight_a = layers[name].lora_A[adapter_name].weight
        weight_b = layers[name].lora_B[adapter_name].weight
        if tuple(a.shape) != tuple(weight_a.shape) or tuple(b.shape) != tuple(weight_b.shape):
            raise ValueError(
                f"set_lora_factors: shape mismatch at {name!r}: got A {tuple(a.shape)}, B {tuple(b.shape)}; "
                f"adapter {adapter_name!r} has A {tuple(weight_a.shape)}, B {tuple(weight_b.shape)}"
            )
    with torch.no_grad():
        for name, (a, b) in factors.items():
            layers[name].lora_A[adapter_name].weight.copy_(a)
            layers[name].lora_B[adapter_name].weight.copy_(b)


_ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


PICKLE_ADAPTER_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # Same matching as peft.utils.other.get_pattern_key: a key matches a dotted suffix (as a regex).
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _refuse_pickle(path: Path) -> None:
    raise ValueError(
        f"{path} is a pickle file; sqsd-ray refuses pickles because loading one can run arbitrary code. "
        f"Convert it once, in an environment you trust, to adapter_model.safetensors next to it: "
        f"python -c \"import torch; from safetensors.torch import save_file; "
        f"save_file(torch.load('{path}', weights_only=True), '{path.with_name('adapter_model.safetensors')}')\""
    )


def _adapter_files(path: str | Path) -> tuple[Path, Path]:
    """(adapter_config.json, adapter_model.safetensors) for an adapter dir or its safetensors file."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix in (".bin", ".pt", ".pth"):
            _refuse_pickle(path)
        weights, directory = path, path.parent
    elif path.is_dir():
        directory, weights = path, path / "adapter_model.safetensors"
        if not weights.is_file():
            for pickle_name in PICKLE_ADAPTER_FILES:
                if (path / pickle_name).is_file():
                    _refuse_pickle(path / pickle_name)
            raise FileNotFoundError(f"{path} has no adapter_model.safetensors (is it a peft adapter dir?)")
    else:
        raise FileNotFoundError(f"peft adapter {path} does not exist")
    config = directory / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{directory} has no adapter_config.json next to {weights.name}")
    return config, weights


def _read_adapter_config(config_path: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict; refuses anything but plain LoRA (other peft types, DoRA, bias, Conv1D)."""
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}): re-save the adapter with save_pretrained") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}; re-save the adapter")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"{config_path}: peft_type {peft_type!r} is not supported; only plain LoRA adapters are")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA bias"), ("fan_in_fan_out", "fan_in_fan_out")):
        if config.get(flag):
            raise ValueError(f"{config_path}: {what} adapters ({flag}=true) are not supported; train plain LoRA")
    return config


def _read_factor_tensors(weights_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Canonical module name -> {"A": tensor, "B": tensor} as found in the weights file (pairs not yet checked).

    Every tensor must be a LoRA factor (``_ADAPTER_KEY``), all of one adapter; peft's prefix is stripped from the
    module names.
    """
    factor_parts: dict[str, dict[str, torch.Tensor]] = {}
    adapter_names: set[str] = set()
    fix = "re-save the adapter (save_pretrained) or point the config at another adapter"
    with open_safetensors(weights_path, "adapter weights file", fix) as handle:
        for key in handle.keys():
            match = _ADAPTER_KEY.match(key)
            if match is None:
                raise ValueError(
                    f"{weights_path}: tensor {key!r} is not a LoRA A/B factor; only plain LoRA on Linear modules "
                    f"is supported (no modules_to_save, embedding LoRA, DoRA or bias)"
                )
            if match["adapter"] is not None:
                adapter_names.add(match["adapter"])
            module = canonical_module_name(match["module"])
            factor_parts.setdefault(module, {})[match["which"]] = handle.get_tensor(key)
    if len(adapter_names) > 1:
        raise ValueError(f"{weights_path}: holds several adapters {sorted(adapter_names)}; save them separately")
    if not factor_parts:
        raise ValueError(
            f"{weights_path}: holds no LoRA factors (an empty adapter, e.g. a ZeRO-3 save without a gather?)"
        )
    return factor_parts


def _global_lora_values(config: dict[str, Any]) -> tuple[float, int, bool]:
    """(lora_alpha, r, use_rslora) of ``adapter_config.json``, with peft's defaults."""
    return float(config.get("lora_alpha", 8)), int(config.get("r", 8)), bool(config.get("use_rslora", False))


def _module_factors(
    factor_parts: dict[str, dict[str, torch.Tensor]], config: dict[str, Any], weights_path: Path
) -> tuple[FactorDict, dict[str, int], dict[str, float]]:
    """(A, B), rank r_m and scaling s_m per module, in sorted name order.

    Each module needs both factors with one rank, the rank ``rank_pattern`` gives it; s_m = α_m/r_m (α_m/√r_m
    with rsLoRA), α_m from ``alpha_pattern``.
    """
    lora_alpha, base_r, use_rslora = _global_lora_values(config)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    factors: FactorDict = {}
    scalings: dict[str, float] = {}
    ranks: dict[str, int] = {}
    for module in sorted(factor_parts):
        parts = factor_parts[module]
        if set(parts) != {"A", "B"}:
            raise ValueError(f"{weights_path}: module {module!r} has lora_{''.join(parts)} but not both A and B")
        a, b = parts["A"], parts["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{weights_path}: module {module!r} has inconsistent factors A {tuple(a.shape)}, B {tuple(b.shape)}"
            )
        rank = int(a.shape[0])
        expected_rank = int(_pattern_value(rank_pattern, module, base_r))
        if rank != expected_rank:
            raise ValueError(
                f"{weights_path}: module {module!r} has rank {rank} but adapter_config.json says {expected_rank}"
            )
        alpha = float(_pattern_value(alpha_pattern, module, lora_alpha))
        factors[module] = (a, b)
        ranks[module] = rank
        scalings[module] = alpha / (math.sqrt(rank) if use_rslora else rank)
    return factors, ranks, scalings


def _adapter_lora_settings(config: dict[str, Any], modules: Iterable[str]) -> LoraSettings:
    """The adapter's global settings; a ``target_modules`` regex is reported as the leaf names of ``modules``."""
    lora_alpha, base_r, use_rslora = _global_lora_values(config)
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets:  # a regex string (or None): report the leaf names found
        targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    return LoraSettings(
        r=base_r,
        alpha=lora_alpha,
        target_modules=sorted(targets),
        dropout=float(config.get("lora_dropout", 0.0) or 0.0),
        use_rslora=use_rslora,
    )


def load_adapter_state(path: str | Path) -> tuple[FactorDict, AdapterInfo]:
    """Read a saved peft LoRA adapter as factors keyed by canonical name, plus its settings.

    Accepts the dir written by ``save_pretrained`` (or its ``adapter_model.safetensors``). Keys may be
    ``….lora_A.weight`` (peft's saved form) or ``….lora_A.<adapter>.weight`` (a live state dict).
    ``rank_pattern`` / ``alpha_pattern`` are honoured through per-module ranks and scalings
    (``AdapterInfo.module_scalings``). Anything that is not a plain ΔW = s·B A per Linear (DoRA, LoRA bias,
    ``modules_to_save``, embedding LoRA, fan-in-fan-out Conv1D layouts) is refused: its task vector would be
    silently incomplete.
    """
    config_path, weights_path = _adapter_files(path)
    config = _read_adapter_config(config_path)
    factors, ranks, scalings = _module_factors(_read_factor_tensors(weights_path), config, weights_path)
    info = AdapterInfo(
        path=str(Path(path).expanduser()),
        lora=_adapter_lora_settings(config, factors),
        module_scalings=scalings,
        module_ranks=ranks,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        peft_version=config.get("peft_version"),
    )
    return factors, info


def save_adapter(
    factors: FactorDict, lora: LoraSettings, directory: str | Path, base_model_name_or_path: str | None = None,
    base_model_revision: str | None = None,
) -> Path:
    """Write (A, B) factors keyed by canonical name as a peft adapter dir (safetensors), with no model loaded.

    The keys and ``adapter_config.json`` are peft's own (``PeftModel.from_pretrained`` loads the dir), so an
    init state such as θ0 + α·V can be exported for ``score`` or any peft user without the base weights. With the
    base model recorded (``loading.base_model_reference``), ``AutoPeftModelForCausalLM.from_pretrained(directory)``
    loads base and adapter in one call.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in sorted(factors.items()):
        if a.shape[0] != lora.r or b.shape[1] != lora.r:
            raise ValueError(f"save_adapter: module {name!r} has rank {a.shape[0]}, the adapter config says r={lora.r}")
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().cpu().contiguous()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = lora.peft_config()
    config.base_model_name_or_path = base_model_name_or_path
    config.revision = base_model_revision
    config.save_pretrained(str(directory))
    return directory


@contextlib.contextmanager
def open_safetensors(path: str | Path, what: str, fix: str, device: str = "cpu") -> Iterator[Any]:
    """``safe_open`` whose errors (a truncated or foreign file) name the file and what to do about it;
    safetensors' own name neither."""
    try:
        with safe_open(str(path), framework="pt", device=device) as handle:
            yield handle
    except SafetensorError as err:
        raise ValueError(f"{what} {path} is not a readable safetensors file ({one_line(err)}): {fix}") from err
