"""The one typed configuration schema: params.yaml -> dataclasses, read once and passed down.

- schema.py: every setting, its type, range and default (the defaults are the built-in demo);
- rules.py: the range markers the schema attaches (Range, Items, Pattern);
- load.py: params file + ``--set section.key=value`` overrides -> a checked Config, and back to YAML;
- stages.py: which settings each DVC stage reads (dvc.yaml's params lists follow it), and a view of a Config
  that holds a stage to them.

Overrides use dotted keys (``--set distill.lr=3e-4``); the value is parsed as YAML and checked like a value from
the file, so ``distill.lr=abc``, ``distill.lrr=1`` or ``distill.lr=-1`` fail with the key named.
"""

from pipeline.config.load import (
    DEFAULTS_HEADER,
    dump_config,
    load_config,
    parse_override,
    read_params_file,
    read_yaml,
    to_dict,
    validate_config,
    write_config,
)
from pipeline.config.rules import Items, Pattern, Range
from pipeline.config.schema import (
    BalancerConfig,
    Config,
    DataConfig,
    DemoConfig,
    DemoSecondTeacherConfig,
    DemoTeacherConfig,
    DistillConfig,
    EvaluateConfig,
    ExtractConfig,
    LossesConfig,
    McadConfig,
    StudentConfig,
    SupervisedConfig,
    TeacherConfig,
)
from pipeline.config.stages import (
    STAGE_PARAMS,
    STAGES,
    StageSettings,
    UndeclaredSetting,
    replace_settings,
    stage_config,
)
from pipeline.errors import ConfigError

__all__ = [
    "DEFAULTS_HEADER",
    "BalancerConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DemoConfig",
    "DemoSecondTeacherConfig",
    "DemoTeacherConfig",
    "DistillConfig",
    "EvaluateConfig",
    "ExtractConfig",
    "Items",
    "LossesConfig",
    "McadConfig",
    "Pattern",
    "Range",
    "STAGES",
    "STAGE_PARAMS",
    "StageSettings",
    "StudentConfig",
    "SupervisedConfig",
    "TeacherConfig",
    "UndeclaredSetting",
    "dump_config",
    "load_config",
    "parse_override",
    "read_params_file",
    "read_yaml",
    "replace_settings",
    "stage_config",
    "to_dict",
    "validate_config",
    "write_config",
]
