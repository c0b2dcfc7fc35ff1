"""Typed config models for every job, YAML loading and readable errors."""

from nic.config.base import (
    ConfigError,
    NicModel,
    RayOptions,
    StageConfig,
    build_config,
    dump_config,
    load_config,
    parse_overrides,
    read_yaml,
)
from nic.config.slides import SlideOptions, TissueOptions

__all__ = [
    "build_config",
    "ConfigError",
    "NicModel",
    "RayOptions",
    "SlideOptions",
    "StageConfig",
    "TissueOptions",
    "dump_config",
    "load_config",
    "parse_overrides",
    "read_yaml",
]
