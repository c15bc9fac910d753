"""Merge methods: pure tensor functions plus declared parameter specs, registered by name."""

from mergesmith.methods.registry import all_specs, get, load_plugin, names, register, register_spec
from mergesmith.methods.spec import REQUIRED, MergeInputs, MethodSpec, Param

__all__ = [
    "REQUIRED",
    "MergeInputs",
    "MethodSpec",
    "Param",
    "all_specs",
    "get",
    "load_plugin",
    "names",
    "register",
    "register_spec",
]
