"""Typed configs: YAML files plus ``--set a.b=c`` overrides, checked against dataclasses.

Every stage owns a dataclass (``DataConfig`` in ``data.records``, ``ModelConfig`` in ``models.loading``, ...). This module
only knows how to build any such dataclass tree from plain dicts, strictly: an unknown key, or a value of the
wrong type, is a ``ConfigError`` that names the dotted key. Fields carry their help text in
``field(metadata={"help": ...})`` so ``sqsd-ray ... --help-config`` can print it. ``RunOutput`` (a run directory
a job owns) is here so that the jobs of every stage can share it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown, missing or ill-typed; the message names the dotted key."""


class _NotFinite(ConfigError):
    """NaN or ±inf in a float field: kept apart so a union (``float | None``) reports it as such."""


def one_line(text: object) -> str:
    """``text`` with its line breaks and runs of spaces squashed: YAML and hub errors span several lines,
    and an error the CLI prints is one line."""
    return " ".join(str(text).split())


def help_field(default: Any = dataclasses.MISSING, help: str = "", identity_if_set: bool = False,
               **kwargs: Any) -> Any:
    """A dataclass field with help text; mutable defaults go through ``default_factory``.

    ``identity_if_set``: the field joins a run's identity (``identity_dict``) only when it differs from its default.
    For a field added later whose default keeps the earlier behaviour, so runs made before it still resume.
    """
    metadata = {"help": help, "identity_if_set": identity_if_set}
    if isinstance(default, (list, dict, set)):
        value = default
        kwargs["default_factory"] = lambda: type(value)(value)
        return dataclasses.field(metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; build nested dataclasses. Ints widen to floats only."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        not_finite = section_error = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except _NotFinite as err:
                not_finite = err
            except ConfigError as err:
                # a mapping given for an optional section: its own error (which key, which value) says more
                if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                    section_error = err
                continue
        if not_finite is not None:
            raise not_finite
        if section_error is not None:
            raise section_error
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in get_args(tp):
            return "on" if value else "off"  # YAML 1.1 reads a bare on / off as a bool
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string; it is plainly a number
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        # NaN passes every comparison a __post_init__ makes (nan < 0 is False) and poisons the scores. No
        # config means "unbounded" by inf (null does that), so ±inf is refused as well.
        if not math.isfinite(value):
            raise _NotFinite(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, strictly; errors name the dotted key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}")
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required config key {prefix}{missing[0]}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from err


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config (for YAML dumps and hashing)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def identity_dict(obj: Any) -> Any:
    """``to_dict`` for the identities resume compares: fields marked ``identity_if_set`` are left out while they
    hold their default."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("identity_if_set") and value == _default(f):
                continue
            out[f.name] = identity_dict(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [identity_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: identity_dict(v) for k, v in obj.items()}
    return obj


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], c) with c parsed as YAML (so 3, 1e-4, true, [q_proj, v_proj] work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(
            f"override {item!r}: value is not valid YAML ({one_line(err)}); fix it, or quote a string that "
            f"holds YAML syntax, e.g. --set 'key=\"a: [b\"'"
        ) from err
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type | None = None) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw dict; with ``cls`` given, unknown keys fail here, naming the key."""
    for item in overrides:
        path, value = parse_override(item)
        node, tp = data, cls
        for i, part in enumerate(path):
            if tp is not None:
                names = {f.name for f in dataclasses.fields(tp)} if dataclasses.is_dataclass(tp) else None
                if names is not None and part not in names:
                    raise ConfigError(f"unknown config key {'.'.join(path[: i + 1])} in override {item!r}")
                if names is not None:
                    hint = get_type_hints(tp)[part]
                    tp = _dataclass_in(hint)
                else:
                    tp = None
            if i == len(path) - 1:
                node[part] = value
            else:
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
                if not isinstance(child, dict):
                    raise ConfigError(f"override {item!r}: {'.'.join(path[: i + 1])} is not a mapping")
                node = child
    return data


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``update`` key by key, nested mappings merged the same way; neither is changed."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    cls: type[T], path: str | Path | Sequence[str | Path] | None = None, overrides: list[str] | None = None
) -> T:
    """YAML file(s) + overrides -> dataclass ``cls``. Several files merge key by key, later ones winning (a job
    file plus a fragment such as ``init select``'s ``init_states.yaml``)."""
    paths = [] if path is None else list(path) if isinstance(path, (list, tuple)) else [path]
    data: dict[str, Any] = {}
    for one in paths:
        data = deep_merge(data, _read_yaml(Path(one)))
    return from_dict(cls, apply_overrides(data, overrides or [], cls))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {one_line(err)}") from err
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return loaded


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-able value, key order independent: the config hash recorded in outputs."""
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per field: dotted key, type, default, help (for ``--help-config``)."""
    lines = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        sub = _dataclass_in(tp)
        if sub is not None:
            lines.append(f"{prefix}{f.name}: {f.metadata.get('help', '')}")
            lines.extend(describe(sub, prefix=f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        lines.append(f"{prefix}{f.name} [{_type_name(tp)}] = {default}  {f.metadata.get('help', '')}")
    return lines


@dataclasses.dataclass
class RunOutput:
    """A run directory the job owns: overwrite deletes what an earlier run left there. A job's own output
    settings go in a subclass."""

    dir: str = help_field("runs/out", help="run directory")
    overwrite: bool = help_field(False, help="replace an existing, non-empty run directory")


def prepare_run_dir(path: str, overwrite: bool) -> Path:
    out = Path(path)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; set output.overwrite: true or another output.dir")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


__all__ = [
    "ConfigError",
    "RunOutput",
    "apply_overrides",
    "deep_merge",
    "describe",
    "from_dict",
    "help_field",
    "load_config",
    "one_line",
    "prepare_run_dir",
    "stable_hash",
    "to_dict",
]
