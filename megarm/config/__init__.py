"""megarm's one typed configuration: a dataclass tree, loaded from YAML, overridden
by ``section.key=value`` arguments, and validated as a whole before any process
group or model exists.

- :mod:`~megarm.config.schema`: the dataclass tree (a docstring on every field;
  ``docs/config.md`` is generated from them) and the error types;
- :mod:`~megarm.config.loading`: YAML, typed settings and overrides, the model's
  shape from ``model.hf_config``;
- :mod:`~megarm.config.checks`: the cross-field checks, by section.

The config is a leaf: it imports neither the checkpoint format nor the data
package, and touches no file but the YAML and the HF ``config.json`` it is given.
The files a run names are checked by :mod:`megarm.preflight`. It must stay
importable without torch: ``python -m megarm.config`` checks a config in well
under two seconds.

    python -m megarm.config --config configs/orm_trainer_tiny.yaml \
        parallel.tensor_model_parallel_size=2 --world-size 2
"""

from megarm.config.checks import (
    REAL_MODEL_PARAMETERS,
    approx_parameters,
    check,
    family_issues,
    layout_issues,
    packed_format,
    reads_cu_seqlens,
    resolve,
    validate,
)
from megarm.config.loading import (
    COMMAND_LINE,
    HF_CONFIG,
    Settings,
    hf_config_path,
    load_config,
    parse_override,
    read_hf_config,
    to_dict,
    to_yaml,
)
from megarm.config.schema import (
    SECTIONS,
    CheckpointConfig,
    ConfigError,
    ConfigIssue,
    DataConfig,
    LoggingConfig,
    MegarmConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainingConfig,
    describe_type,
    field_docs,
    markdown_reference,
)

__all__ = [
    "COMMAND_LINE",
    "HF_CONFIG",
    "REAL_MODEL_PARAMETERS",
    "SECTIONS",
    "CheckpointConfig",
    "ConfigError",
    "ConfigIssue",
    "DataConfig",
    "LoggingConfig",
    "MegarmConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "Settings",
    "TrainingConfig",
    "approx_parameters",
    "check",
    "describe_type",
    "family_issues",
    "field_docs",
    "hf_config_path",
    "layout_issues",
    "load_config",
    "markdown_reference",
    "packed_format",
    "parse_override",
    "read_hf_config",
    "reads_cu_seqlens",
    "resolve",
    "to_dict",
    "to_yaml",
    "validate",
]
