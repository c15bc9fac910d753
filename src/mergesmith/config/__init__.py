"""The merge configuration language (mergekit-compatible YAML): schema, loading, parameter resolution."""

from mergesmith.config.load import load_config, load_config_text
from mergesmith.config.schema import MergeConfig

__all__ = ["MergeConfig", "load_config", "load_config_text"]
