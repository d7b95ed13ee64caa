"""Safety / danger directions as factored LoRA task vectors, and the initialisation states built from them.

A direction V (paper Eq. 3–4: V = θ̂ − θ0, a task vector) is stored per LoRA-augmented module m as
V_m = s_v · B_v A_v (Eq. 2: ΔW = (α/r)·B A), with A_v ∈ R^{r×d_in}, B_v ∈ R^{d_out×r}. It is KEPT FACTORED:
everything SQSD needs from it reduces to r×r algebra, never a d_out×d_in matrix —

* ‖s B A‖²_F = s² ⟨BᵀB, AAᵀ⟩_F                              (r×r Gram matrices)
* ⟨s1 B1 A1, s2 B2 A2⟩_F = s1 s2 tr((B1ᵀB2)(A2A1ᵀ)) = s1 s2 ⟨B1ᵀB2, A1A2ᵀ⟩_F   (r1×r2 matrices)

The scorer projects a sample's update ΔW_m(z) on V̂_m = V_m / ‖V_m‖ module-wise (Eq. 7–8, 11), so the
sign convention is V = θ_target − θ0: a positive projection moves θ towards the direction's end state.

``init_state_from_direction`` expresses the steered state θ0 + α·V (Eq. 5) as the LoRA factors of the
adapter the scorer differentiates through (the safety initialisation of §4.3).

Files: one ``.safetensors`` per direction, tensors ``{module}.A`` / ``{module}.B``, per-module scalings and
the metadata as JSON strings in the safetensors header. No pickle, no transformers import at module top.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .lora import load_adapter_state, open_safetensors

FORMAT = "sqsd-direction/1"
DIRECTION_KINDS = ("danger", "safety")
ACCUMULATE_DTYPE = torch.float64  # r×r Gram algebra is cheap; fp64 keeps norms/inner products exact enough


class DirectionMismatchError(ValueError):
    """A direction does not fit the model's LoRA modules; the message names the offending module."""


# ------------------------------------------------------------------------------------------- factors


def factored_inner(
    b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor, dtype: torch.dtype = ACCUMULATE_DTYPE
) -> torch.Tensor:
    """⟨B1 A1, B2 A2⟩_F without forming either product: ⟨B1ᵀB2, A1A2ᵀ⟩_F, cost O(r1·r2·(d_out + d_in))."""
    b_gram = b1.to(dtype).T @ b2.to(dtype)  # (r1×d_out)(d_out×r2) -> r1×r2
    a_gram = a1.to(dtype) @ a2.to(dtype).T  # (r1×d_in)(d_in×r2)  -> r1×r2
    return (b_gram * a_gram).sum()


@dataclass
class LoraFactors:
    """One module's V_m = scaling · B A, with A: r×d_in and B: d_out×r."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"LoRA factors need A (r×d_in) and B (d_out×r) with the same r; "
                f"got A {tuple(self.A.shape)}, B {tuple(self.B.shape)}"
            )
        self.scaling = float(self.scaling)
        if not math.isfinite(self.scaling):
            raise ValueError(f"LoRA scaling must be finite, got {self.scaling}")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the dense V_m."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The d_out×d_in matrix scaling·B·A — for tests and debugging only."""
        return self.scaling * (self.B.to(dtype) @ self.A.to(dtype))

    def norm_sq(self) -> float:
        """‖s B A‖²_F = s²·⟨BᵀB, AAᵀ⟩_F, in fp64."""
        return self.scaling**2 * float(factored_inner(self.B, self.A, self.B, self.A))

    def norm(self) -> float:
        return math.sqrt(max(self.norm_sq(), 0.0))  # clamp: fp64 rounding can give -0.0 for V_m = 0

    def inner(self, other: LoraFactors) -> float:
        """⟨s1 B1 A1, s2 B2 A2⟩_F = s1 s2 tr((B1ᵀB2)(A2A1ᵀ)), in fp64; ranks may differ."""
        if self.shape != other.shape:
            raise ValueError(f"inner product of LoRA factors with different shapes {self.shape} and {other.shape}")
        return self.scaling * other.scaling * float(factored_inner(self.B, self.A, other.B, other.A))

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LoraFactors:
        return LoraFactors(self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype), self.scaling)


# ----------------------------------------------------------------------------------------- direction


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_kind(kind: str) -> str:
    if kind not in DIRECTION_KINDS:
        raise ValueError(f"direction kind must be one of {DIRECTION_KINDS}, got {kind!r}")
    return kind


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


_REBUILD = ("rebuild it (sqsd-ray directions build / export) or point the config's direction key "
            "(e.g. directions.danger) at another file")


class Direction:
    """A task vector V = {V_m = s_m B_m A_m}, keyed by canonical module name (see ``sqsd_ray.models``)."""

    def __init__(self, modules: Mapping[str, LoraFactors], metadata: Mapping[str, str] | None = None) -> None:
        if not modules:
            raise ValueError("a direction needs at least one module")
        self.modules: dict[str, LoraFactors] = dict(sorted(modules.items()))
        self.metadata: dict[str, str] = dict(metadata or {})
        bad = [k for k, v in self.metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"direction metadata must map str to str; offending key(s): {bad}")

    def __repr__(self) -> str:
        kind = self.metadata.get("kind", "?")
        ranks = sorted(self.ranks())
        return f"Direction(kind={kind!r}, modules={len(self.modules)}, ranks={ranks}, norm={self.norm():.4g})"

    def __eq__(self, other: object) -> bool:  # bit-exact equality (used by round-trip tests)
        if not isinstance(other, Direction) or self.metadata != other.metadata:
            return False
        if self.modules.keys() != other.modules.keys():
            return False
        return all(
            f.scaling == g.scaling
            and f.A.dtype == g.A.dtype
            and f.B.dtype == g.B.dtype
            and torch.equal(f.A, g.A)
            and torch.equal(f.B, g.B)
            for f, g in ((self.modules[m], other.modules[m]) for m in self.modules)
        )

    __hash__ = None  # mutable container

    # -- summaries

    @property
    def kind(self) -> str | None:
        return self.metadata.get("kind")

    def ranks(self) -> set[int]:
        return {f.rank for f in self.modules.values()}

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Canonical name -> (d_out, d_in), comparable with ``models.lora_module_shapes``."""
        return {name: f.shape for name, f in self.modules.items()}

    def module_norms(self) -> dict[str, float]:
        """‖V_m‖_F per module (the normaliser of V̂_m in Eq. 11)."""
        return {name: f.norm() for name, f in self.modules.items()}

    def norm(self) -> float:
        """Global ‖V‖ = sqrt(Σ_m ‖V_m‖²) (the normaliser of V̂ in Eq. 7–8)."""
        return math.sqrt(sum(max(f.norm_sq(), 0.0) for f in self.modules.values()))

    def fingerprint(self) -> str:
        """sha256 over sorted module names, scalings, dtypes, shapes and factor bytes; 16 hex chars."""
        digest = hashlib.sha256()
        for name in sorted(self.modules):
            f = self.modules[name]
            digest.update(f"{name}|{f.scaling!r}|{f.A.dtype}|{tuple(f.A.shape)}|{tuple(f.B.shape)}|".encode())
            digest.update(_tensor_bytes(f.A))
            digest.update(_tensor_bytes(f.B))
        return digest.hexdigest()[:16]

    # -- checks and transforms

    def check_matches(self, shapes: Mapping[str, tuple[int, int]], allow_missing: bool = False) -> None:
        """Raise ``DirectionMismatchError`` unless the direction covers exactly the model's LoRA modules.

        ``shapes`` is ``models.lora_module_shapes(model, lora)``. Three failures, each naming a module:
        a direction module the model does not have, a model module the direction lacks (its SQSD_m would
        silently be 0; ``allow_missing=True`` accepts that), and a (d_out, d_in) mismatch.
        """
        total = len(self.modules)
        extra = sorted(set(self.modules) - set(shapes))
        if extra:
            raise DirectionMismatchError(
                f"direction module {extra[0]!r} is not a LoRA module of the model"
                + (f" (and {len(extra) - 1} more of {total})" if len(extra) > 1 else "")
                + "; was the direction built for another base model or other lora.target_modules?"
            )
        missing = sorted(set(shapes) - set(self.modules))
        if missing and not allow_missing:
            raise DirectionMismatchError(
                f"model LoRA module {missing[0]!r} is missing from the direction"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; align lora.target_modules with the modules the direction was trained on"
            )
        for name in self.modules:
            expected = tuple(int(d) for d in shapes[name])
            if self.modules[name].shape != expected:
                raise DirectionMismatchError(
                    f"shape mismatch at module {name!r}: direction (d_out, d_in) = {self.modules[name].shape}, "
                    f"model = {expected}"
                )

    def scaled(self, alpha: float) -> Direction:
        """α·V, by scaling each module's s_m (the factors are shared, not copied)."""
        metadata = dict(self.metadata)
        metadata["scaled_by"] = repr(float(metadata.get("scaled_by", "1.0")) * float(alpha))
        return Direction(
            {name: LoraFactors(f.A, f.B, f.scaling * float(alpha)) for name, f in self.modules.items()}, metadata
        )

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Direction:
        return Direction({name: f.to(dtype, device) for name, f in self.modules.items()}, self.metadata)

    # -- files: the format and its checks are in the module-level functions below

    def save(self, path: str | Path) -> Path:
        return save_direction(self, path)

    @staticmethod
    def read_header(path: str | Path) -> dict[str, Any]:
        return read_direction_header(path)

    @staticmethod
    def load(path: str | Path, device: str | torch.device = "cpu") -> Direction:
        return load_direction(path, device)

    @staticmethod
    def from_peft_adapter(
        path: str | Path, kind: str = "danger", base_model: str | None = None, **metadata: str
    ) -> Direction:
        return direction_from_peft_adapter(path, kind, base_model, **metadata)


# ------------------------------------------------------------------------------------------------ files


def save_direction(direction: Direction, path: str | Path) -> Path:
    """Write one ``.safetensors`` file; scalings and metadata go in the header as JSON strings."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"direction files end in .safetensors, got {path}")
    tensors: dict[str, torch.Tensor] = {}
    for name, f in direction.modules.items():
        # clone: safetensors refuses tensors that share storage (e.g. views of one buffer)
        tensors[f"{name}.A"] = f.A.detach().cpu().contiguous().clone()
        tensors[f"{name}.B"] = f.B.detach().cpu().contiguous().clone()
    header = {
        "format": FORMAT,
        "metadata": json.dumps(direction.metadata, sort_keys=True),
        "scalings": json.dumps({name: f.scaling for name, f in direction.modules.items()}),
        "shapes": json.dumps({name: [*f.shape, f.rank] for name, f in direction.modules.items()}),
        "fingerprint": direction.fingerprint(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return path


def read_direction_header(path: str | Path) -> dict[str, Any]:
    """The decoded header (format, metadata, scalings, shapes, fingerprint) without loading tensors."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".safetensors":
        raise ValueError(
            f"{path} is not a direction file (*.safetensors written by Direction.save); "
            f"to build one from a peft adapter dir use Direction.from_peft_adapter"
        )
    with open_safetensors(path, "direction file", _REBUILD) as handle:
        header = handle.metadata() or {}
    if header.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not an SQSD direction file (header format {header.get('format')!r}, expected {FORMAT!r}); "
            f"to build one from a peft adapter use Direction.from_peft_adapter"
        )
    try:
        return {
            "format": header["format"],
            "metadata": json.loads(header["metadata"]),
            "scalings": json.loads(header["scalings"]),
            "shapes": {k: tuple(v) for k, v in json.loads(header["shapes"]).items()},
            "fingerprint": header["fingerprint"],
        }
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"direction file {path} has a damaged header ({type(err).__name__}: {err}): "
                         f"{_REBUILD}") from err


def load_direction(path: str | Path, device: str | torch.device = "cpu") -> Direction:
    """Read a file written by ``save_direction``; the stored fingerprint is verified against the tensors."""
    header = read_direction_header(path)
    modules: dict[str, LoraFactors] = {}
    with open_safetensors(path, "direction file", _REBUILD, device=str(device)) as handle:
        keys = set(handle.keys())
        for name, scaling in header["scalings"].items():
            if f"{name}.A" not in keys or f"{name}.B" not in keys:
                raise ValueError(f"{path}: module {name!r} lacks its .A or .B tensor (truncated file?)")
            modules[name] = LoraFactors(handle.get_tensor(f"{name}.A"), handle.get_tensor(f"{name}.B"), scaling)
    direction = Direction(modules, header["metadata"])
    if direction.fingerprint() != header["fingerprint"]:
        raise ValueError(
            f"{path}: content fingerprint {direction.fingerprint()} differs from the stored "
            f"{header['fingerprint']}; the file was modified or corrupted — rebuild it"
        )
    return direction


def direction_from_peft_adapter(
    path: str | Path, kind: str = "danger", base_model: str | None = None, **metadata: str
) -> Direction:
    """V = Σ_m s_m B_m A_m from a saved peft LoRA adapter (θ̂ − θ0 of Eq. 3–4 when trained from θ0).

    Per-module scalings honour ``rank_pattern`` / ``alpha_pattern``. ``base_model`` defaults to the
    adapter's ``base_model_name_or_path``.
    """
    factors, info = load_adapter_state(path)
    modules = {name: LoraFactors(a, b, info.module_scalings[name]) for name, (a, b) in factors.items()}
    meta = {
        "kind": _check_kind(kind),
        "base_model": base_model or info.base_model_name_or_path or "unknown",
        "source": f"peft-adapter:{Path(path).expanduser()}",
        "created": _now(),
        "num_modules": str(len(modules)),
        "lora_r": str(info.lora.r),
        "lora_alpha": repr(info.lora.alpha),
        "use_rslora": str(info.lora.use_rslora).lower(),
        **metadata,
    }
    return Direction(modules, meta)


# ----------------------------------------------------------------------------------------- factories


def direction_from_factors(
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    scaling: float | Mapping[str, float],
    kind: str = "danger",
    base_model: str = "unknown",
    source: str = "factors",
    **metadata: str,
) -> Direction:
    """Direction from {canonical name: (A, B)} (e.g. ``models.get_lora_factors``) and one or per-module scalings."""
    if isinstance(scaling, Mapping):
        missing = sorted(set(factors) - set(scaling))
        if missing:
            raise ValueError(f"no scaling given for module {missing[0]!r}")
        scalings = {name: float(scaling[name]) for name in factors}
    else:
        scalings = {name: float(scaling) for name in factors}
    modules = {name: LoraFactors(a.detach(), b.detach(), scalings[name]) for name, (a, b) in factors.items()}
    meta = {
        "kind": _check_kind(kind),
        "base_model": base_model,
        "source": source,
        "created": _now(),
        "num_modules": str(len(modules)),
        **metadata,
    }
    return Direction(modules, meta)


def random_direction(
    shapes: Mapping[str, tuple[int, int]],
    rank: int = 8,
    seed: int = 0,
    scale: float = 1.0,
    kind: str = "danger",
    dtype: torch.dtype = torch.float32,
) -> Direction:
    """Seeded Gaussian direction for tests/demos: A ~ N(0, 1/d_in), B ~ N(0, 1/r), scaling = ``scale``."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name in sorted(shapes):  # sorted: the same seed gives the same direction whatever the dict order
        d_out, d_in = shapes[name]
        a = torch.randn(rank, d_in, generator=generator, dtype=torch.float64) / math.sqrt(d_in)
        b = torch.randn(d_out, rank, generator=generator, dtype=torch.float64) / math.sqrt(rank)
        factors[name] = (a.to(dtype), b.to(dtype))
    return direction_from_factors(factors, scale, kind=kind, source=f"random(seed={seed}, rank={rank})")


# ---------------------------------------------------------------------------------- initial states


def init_state_from_direction(
    direction: Direction, alpha: float, lora_scaling: float, lora_rank: int | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRA factors (A0, B0) per module that put a LoRA adapter with scaling ``lora_scaling`` at θ0 + α·V.

    The steered state of Eq. 5 is W_m = W0_m + α·s_v·B_v A_v. A LoRA adapter with scaling s realises
    W0_m + s·B0 A0, so choosing

        A0 = A_v,    B0 = α·(s_v / s)·B_v      ⇒   s·B0·A0 = α·s_v·B_v A_v = α·V_m   (exactly)

    makes θ0 + α·V the adapter's initial state; the scorer then differentiates w.r.t. (A0, B0). The
    factor α·s_v/s is formed in fp64 and B0 is rounded once to the direction's dtype.

    ``lora_rank`` (the adapter's r; default: each module's direction rank) may exceed the direction's rank
    r_v: A0 gets r − r_v zero rows and B0 r − r_v zero columns, which leaves s·B0·A0 unchanged. Those
    padded slots receive zero gradient at this state (g_A rows ∝ B0 columns = 0, g_B columns ∝ A0 rows = 0),
    so the first-order update equals that of a rank-r_v adapter. r < r_v cannot be exact and is refused.

    Note α = 0 gives B0 = 0, where g_A vanishes (as for a fresh peft adapter): the state matters (§4.3).
    """
    if lora_scaling == 0 or not math.isfinite(lora_scaling):
        raise ValueError(f"lora_scaling must be a non-zero finite number, got {lora_scaling}")
    state: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, f in direction.modules.items():
        rank = f.rank if lora_rank is None else int(lora_rank)
        if rank < f.rank:
            raise ValueError(
                f"module {name!r}: direction rank {f.rank} exceeds the LoRA rank {rank}; "
                f"set lora.r >= {f.rank} (a lower rank cannot represent θ0 + α·V exactly)"
            )
        factor = float(alpha) * f.scaling / float(lora_scaling)  # Python float: fp64
        a0 = f.A.detach().clone()  # r_v×d_in
        b0 = (f.B.detach().to(torch.float64) * factor).to(f.B.dtype)  # d_out×r_v
        if rank > f.rank:
            pad = rank - f.rank
            a0 = torch.cat([a0, a0.new_zeros(pad, a0.shape[1])], dim=0)  # r×d_in
            b0 = torch.cat([b0, b0.new_zeros(b0.shape[0], pad)], dim=1)  # d_out×r
        state[name] = (a0, b0)
    return state
