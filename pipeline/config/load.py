"""Reading settings: a params file and --set overrides -> a checked Config, and the Config back to YAML.

Every value passes the same checks whether it comes from the file or from --set: its type, its range (the
schema's Annotated markers), then the combinations of settings that only make sense together. A params file
may be partial (missing keys keep their defaults), but it must exist, be readable and hold a mapping: a missing
or empty file is an error, never a silent run on the defaults.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from pipeline.config.rules import Items, Pattern, Range
from pipeline.config.schema import Config
from pipeline.errors import ConfigError

__all__ = [
    "DEFAULTS_HEADER", "load_config", "parse_override", "validate_config", "dump_config", "write_config", "to_dict",
    "read_yaml", "read_params_file",
]

# The fix for a missing or empty params file: how to write a full one.
_WRITE_ONE = (
    "write the demo's with `dsmd config --defaults --out {path}`, or a recipe's with "
    "`dsmd --params recipes/flickr30k.yaml config --out {path}`"
)


# The header of the shipped params.yaml.
DEFAULTS_HEADER = """\
The built-in demo: every dsmd setting at its default, as `dsmd config --defaults` prints it (a test keeps the two
equal; regenerate with `dsmd config --defaults --out params.yaml`). pipeline/config/schema.py gives each setting's
meaning, allowed range and, where the demo departs from the paper's recipe, why; recipes/ hold the paper's
settings. Change one with --set section.key=value, or `dvc exp run -S section.key=value`."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats (3e-4 and 1e5 are numbers, not strings as YAML 1.1 has them:
    DVC reads params.yaml as YAML 1.2), and a key given twice in one mapping is an error, as it is for DVC."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key_node.value!r} appears twice in one mapping", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def read_yaml(text: str) -> Any:
    """Parse YAML text as params files are read (YAML 1.2 floats, no duplicate keys)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (getattr(exc, "problem", None) or str(exc).replace("\n", " "))


# ------------------------------------------------------------------------------------------------- checks


def _check_rule(key: str, value: Any, rule: Any) -> None:
    if isinstance(rule, Range) and not rule.contains(value):
        raise ConfigError(f"{key}: {value!r} is out of range; it must be {rule}")
    if isinstance(rule, Items):
        if len(value) < rule.min:
            raise ConfigError(f"{key}: needs at least {rule.min} entr{'y' if rule.min == 1 else 'ies'}, got {value!r}")
        twice = [item for item, count in Counter(map(repr, value)).items() if count > 1]
        if rule.unique and twice:
            raise ConfigError(f"{key}: {twice[0]} is listed twice in {value!r}")
    if isinstance(rule, Pattern) and not rule.matches(value):
        raise ConfigError(f"{key}: {value!r} is not allowed; it must be {rule.meaning}")


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return value converted to type tp, or raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *rules = typing.get_args(tp)
        value = _check_value(key, value, base)
        for rule in rules:
            _check_rule(key, value, rule)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_value(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    raise ConfigError(f"{key}: unsupported setting type {tp}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names, key=str)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown setting {where}{unknown[0]} (known in {prefix or 'the top level'}: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _check_value(key, value, hints[name])
    return cls(**kwargs)


def _check_combinations(cfg: Config) -> None:
    """Settings that are each in range but wrong together: one message naming both, before any work starts
    (they would otherwise fail deep inside a stage, some only after hours of extraction)."""
    ex, st, dc, mc = cfg.extract, cfg.student, cfg.distill, cfg.distill.mcad
    if ex.rows_per_shard % ex.rows_per_chunk:
        raise ConfigError(
            f"extract.rows_per_shard ({ex.rows_per_shard}) must be a multiple of extract.rows_per_chunk "
            f"({ex.rows_per_chunk}): a shard is a whole number of chunks"
        )
    if dc.batch_size % dc.grad_accum:
        raise ConfigError(
            f"distill.batch_size ({dc.batch_size}) must be a multiple of distill.grad_accum ({dc.grad_accum}): "
            "an optimiser step is grad_accum equal micro-batches"
        )
    if st.img_size % st.patch_size:
        raise ConfigError(
            f"student.img_size ({st.img_size}) must be a multiple of student.patch_size ({st.patch_size})"
        )
    if not st.text_model_dir and st.text_hidden % st.text_heads:
        raise ConfigError(
            f"student.text_hidden ({st.text_hidden}) must be a multiple of student.text_heads ({st.text_heads})"
        )
    for key, sizes in (("demo_teacher", cfg.demo_teacher), ("demo_teacher.second", cfg.demo_teacher.second)):
        if sizes.embed_dim % sizes.heads:
            raise ConfigError(
                f"{key}.embed_dim ({sizes.embed_dim}) must be a multiple of {key}.heads ({sizes.heads})"
            )
    names = [cfg.teacher.name, *(teacher.name for teacher in cfg.extra_teachers)]
    twice = [name for name, count in Counter(names).items() if count > 1]
    if twice:
        raise ConfigError(
            f"teacher name {twice[0]!r} is used twice (teacher.name and extra_teachers[].name): each teacher "
            "needs its own name in the store"
        )
    if len(mc.teacher_weights) != len(mc.teachers):
        raise ConfigError(
            f"distill.mcad.teacher_weights has {len(mc.teacher_weights)} entries for the {len(mc.teachers)} "
            f"teachers of distill.mcad.teachers {mc.teachers}: give one weight per teacher"
        )
    if sum(mc.teacher_weights) <= 0:
        raise ConfigError("distill.mcad.teacher_weights are all 0: give at least one teacher a positive weight")
    if dc.method == "mcad" and dc.teacher != mc.teachers[0]:
        raise ConfigError(
            f"distill.method=mcad: distill.teacher ({dc.teacher!r}) must be the first of distill.mcad.teachers "
            f"{mc.teachers}, the teacher whose space the student learns"
        )


def validate_config(cfg: Config) -> Config:
    """Check a Config built in code as a loaded one is checked; returns it."""
    _check_combinations(_build(Config, to_dict(cfg)))
    return cfg


# ------------------------------------------------------------------------------------------------- loading


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value``; the value is read as YAML as the params file is (3e-4, true, [1, 5])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot read value {raw!r}: {_yaml_problem(exc)}") from None
    return key, value


def read_params_file(path: str | Path) -> dict:
    """The settings tree of a params file: it must exist, be readable YAML and hold a mapping of sections."""
    path = Path(path)
    fix = _WRITE_ONE.format(path=path)
    if not path.exists():
        raise ConfigError(f"{path}: no such settings file; {fix}; or pass --params FILE")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{path}: cannot read the settings file ({reason})") from None
    try:
        tree = read_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    if tree is None:
        # Often a file emptied by `dsmd config > same-file` (the shell empties it before dsmd reads it).
        raise ConfigError(f"{path}: the settings file is empty; {fix}")
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (data:, distill:, ...) at the top level, got "
            f"{type(tree).__name__} {tree!r:.60}"
        )
    return tree


def load_config(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Read a params file (None: the built-in defaults alone), apply overrides, and check every key, type,
    range and combination. Keys missing from the file keep their defaults."""
    tree = {} if path is None else read_params_file(path)
    if tree:
        # The file on its own first, so that an error in it names the file.
        try:
            _check_combinations(_build(Config, copy.deepcopy(tree)))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree)
    _check_combinations(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, header: str = "") -> str:
    """The YAML of every setting, in schema order; ``header`` (lines of text) goes first as comments."""
    comments = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    return comments + yaml.safe_dump(to_dict(cfg), sort_keys=False)


def write_config(cfg: Config, path: str | Path, header: str = "") -> None:
    """Write dump_config's text to path, whole or not at all."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(dump_config(cfg, header), encoding="utf-8")
    os.replace(partial, path)
