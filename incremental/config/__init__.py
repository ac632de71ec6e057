"""Run configuration: strict, typed, loaded from YAML.

Four parts, one job each:

- :mod:`.fields`: what plugin authors import for their own configs (``opt``, ``Component``);
- :mod:`.schema`: ``RunConfig`` and its sections;
- :mod:`.parse`: the strict typed parser (plain data into dataclasses, errors naming the key),
  ``to_dict`` and ``config_differences``;
- :mod:`.files`: YAML, ``extends:``, ``--set`` and which file each key came from.

The names below are the public surface: ``from incremental.config import opt, load_config``.
"""

from .fields import Component, EmptyConfig, component, component_list, opt
from .files import (ConfigSource, apply_override, load_config, parse_override, protocol_descriptions, protocol_names,
                    read_yaml, resolve_config_path)
from .parse import RESULT_NEUTRAL_KEYS, config_differences, dump_yaml, parse_dataclass, to_dict
from .schema import (MemoryConfig, OptimizerConfig, OutputConfig, ProtocolConfig, RunConfig, SchedulerConfig,
                     TrainingConfig, probe_labels)

__all__ = [
    "Component", "ConfigSource", "EmptyConfig", "MemoryConfig", "OptimizerConfig", "OutputConfig", "ProtocolConfig",
    "RESULT_NEUTRAL_KEYS", "RunConfig", "SchedulerConfig", "TrainingConfig", "apply_override", "component",
    "component_list", "config_differences", "dump_yaml", "load_config", "opt", "parse_dataclass", "parse_override",
    "probe_labels", "protocol_descriptions", "protocol_names", "read_yaml", "resolve_config_path", "to_dict",
]
