"""Which settings each DVC stage reads, declared once.

``params``: the settings whose change must rerun the stage; dvc.yaml's `params:` list of the stage is exactly
this (a test compares them). ``reads``: the other settings the stage reads, deliberately not DVC params: file
locations (DVC follows the files themselves, through the deps and outs that interpolate them) and run-time
knobs that do not change the result (devices, workers, inference batch sizes).

A stage reads its own section where it can. Where one stage reads another's settings, the declaration says so:

- extract (`dsmd extract-pairs`) reads distill.method and distill.mcad.{fused_teacher, teachers, pair_splits,
  align_ridge}. They stay in distill.mcad, declared here: they describe what MCAD training consumes, which the
  pair features and alignment maps are made for, and moving them would split one method's settings over two
  sections and rename keys that recorded experiments (results/ablations.json) use.
- demo_teacher's fit report scores the fitted teacher on evaluate.split with evaluate.ks, so that it compares
  with evaluate's report; the fitted weights do not depend on them.
- evaluate scores distill.teacher's features beside the student's.
- distill validates with its own distill.val_ks / val_batch_size (not evaluate's): they choose the student it
  keeps, so a change must rerun distill.

`stage_config(cfg, stage)` hands a stage only what it declares: reading anything else raises at once, which
keeps these declarations (and dvc.yaml) honest as the stages change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipeline.config.schema import Config
from pipeline.errors import ConfigError

__all__ = ["StageSettings", "STAGES", "STAGE_PARAMS", "stage_config", "replace_settings", "UndeclaredSetting"]


@dataclass(frozen=True)
class StageSettings:
    params: tuple[str, ...]
    reads: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return self.params + self.reads


STAGES: dict[str, StageSettings] = {
    "demo_data": StageSettings(params=("demo",)),
    "prepare": StageSettings(params=("data",)),
    "demo_teacher": StageSettings(
        params=(
            "demo_teacher", "teacher.img_size", "teacher.max_text_len", "extra_teachers", "evaluate.split",
            "evaluate.ks",
        ),
        # teacher.checkpoint / size / tokenizer say where the fitted files go; kind and name are checked.
        # demo.pretrain_dir is a DVC dep (demo_data's output); n_pretrain = 0 fits on the train split instead.
        reads=("data.canonical_dir", "teacher", "demo.pretrain_dir", "demo.n_pretrain"),
    ),
    "extract": StageSettings(
        params=(
            "teacher",
            # extra_teachers' checkpoints cannot be DVC deps (a list), so their settings are params, and so is
            # demo_teacher.second, which refits the demo's second checkpoint.
            "extra_teachers",
            "demo_teacher.second",
            "distill.method",
            "distill.mcad.fused_teacher",
            "distill.mcad.teachers",
            "distill.mcad.pair_splits",
            "distill.mcad.align_ridge",
            "extract.store",
            "extract.backend",
            "extract.dtype",
            "extract.precision",
            "extract.rows_per_shard",
            "extract.rows_per_chunk",
            "extract.splits",
            "extract.views",
            "extract.view_min_scale",
            "extract.view_seed",
        ),
        # The rest of extract: device, batch sizes, workers, threads, Dask (how fast, not what).
        reads=("data.canonical_dir", "extract"),
    ),
    "distill": StageSettings(
        params=("student", "distill"),
        reads=("data.canonical_dir", "extract.store", "extract.tracked", "extract.cache_dir", "extract.cache_gb"),
    ),
    "evaluate": StageSettings(
        params=("evaluate", "distill.teacher"),
        reads=("data.canonical_dir", "extract.store", "extract.tracked", "extract.cache_dir", "extract.cache_gb",
               "distill.out_dir"),
    ),
}

STAGE_PARAMS: dict[str, list[str]] = {name: list(stage.params) for name, stage in STAGES.items()}


class UndeclaredSetting(ConfigError, AttributeError):
    """A stage read a setting that pipeline/config/stages.py does not declare for it."""


class _Section:
    """A read-only view of one section of the settings: declared keys give their values (whole sections as the
    real dataclass objects), anything else raises UndeclaredSetting."""

    def __init__(self, stage: str, node: Any, path: str, allowed: frozenset[str]):
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_allowed", allowed)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # copy / pickle probing, or a read before __init__ ran
            raise AttributeError(name)
        key = f"{self._path}.{name}" if self._path else name
        value = getattr(self._node, name)  # an unknown name raises AttributeError as for the real object
        if key in self._allowed:
            return value
        if any(allowed.startswith(key + ".") for allowed in self._allowed):
            return _Section(self._stage, value, key, self._allowed)
        raise UndeclaredSetting(
            f"stage {self._stage} read {key}, which it does not declare: add it to STAGES[{self._stage!r}] in "
            "pipeline/config/stages.py (and to dvc.yaml's params if a change must rerun the stage)"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the settings of stage {self._stage} are read-only")

    def __repr__(self) -> str:
        return f"<settings of stage {self._stage}: {self._path or 'all'} (declared only)>"


def stage_config(cfg: Config, stage: str) -> Config:
    """cfg as the stage may see it: its declared settings, with the Config's attribute paths (whole declared
    sections are the real dataclasses, so dataclasses.asdict works on them). Reading any other setting raises
    UndeclaredSetting."""
    if stage not in STAGES:
        raise ConfigError(f"no settings are declared for stage {stage!r} (known: {', '.join(STAGES)})")
    allowed = frozenset(STAGES[stage].keys)
    for key in allowed:
        _resolve(cfg, key)  # a typo in a declaration fails here, not at the read
    return _Section(stage, cfg, "", allowed)  # type: ignore[return-value]


def replace_settings(cfg: Config, **changes: Any) -> Config:
    """dataclasses.replace for the settings a stage holds, a stage's view (from stage_config) included: the copy
    is the same kind of view, so a stage that swaps its teacher or worker count still sees only what it
    declares. Changing a setting the stage does not declare raises UndeclaredSetting."""
    if not isinstance(cfg, _Section):
        return dataclasses.replace(cfg, **changes)
    for name in changes:
        getattr(cfg, name)  # an undeclared key raises here, as a read would
    node = dataclasses.replace(cfg._node, **changes)
    return _Section(cfg._stage, node, cfg._path, cfg._allowed)  # type: ignore[return-value]


def _resolve(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            raise ConfigError(f"stage settings name {key!r}, which is not a setting")
        node = getattr(node, part)
    return node
