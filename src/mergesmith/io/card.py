"""The README.md model card: front matter for the hub, the inputs, the method and the config itself."""

from __future__ import annotations

from mergesmith.config.schema import MergeConfig


def model_card(cfg: MergeConfig, config_yaml: str, version: str) -> str:
    refs = [str(r) for r in cfg.referenced_models()]
    base = str(cfg.base_model) if cfg.base_model else None
    hub = [r for r in refs if r.count("/") == 1 and not r.startswith((".", "/", "~"))]
    front = ["---", "library_name: transformers", "tags:", "- mergesmith", "- merge"]
    if hub:
        front += ["base_model:"] + [f"- {r}" for r in hub]
    front.append("---")
    lines = [
        *front,
        "# Merged model",
        "",
        f"Made with [mergesmith](https://pypi.org/project/mergesmith/) {version} using the "
        f"`{cfg.merge_method}` merge method.",
        "",
        "## Inputs",
        "",
        *(f"- {r}{' (base model)' if r == base else ''}" for r in refs),
        "",
        "## Configuration",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
