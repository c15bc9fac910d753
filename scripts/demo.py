"""End-to-end demo: build two tiny Llama models, slerp-merge them with the mergesmith CLI, load and generate.

Run from the repository root (``make demo``). Everything is written under ./demo/; nothing is downloaded.
The models are random, so the generated text is gibberish: the point is that the merged checkpoint is a
normal Hugging Face model directory that transformers loads and runs.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from mergesmith.testing import make_finetune, make_model

DEMO_DIR = Path("demo")
MODELS_DIR = DEMO_DIR / "models"
CONFIG_PATH = DEMO_DIR / "slerp.yml"
MERGED_DIR = DEMO_DIR / "merged"
NUM_LAYERS = 4

CONFIG_TEMPLATE = """\
# Spherical interpolation between a tiny base model and a noisy "fine-tune" of it.
# t runs 0 -> 1 over the layers for attention and 1 -> 0 for the MLPs; everything else gets 0.5.
slices:
  - sources:
      - model: {base}
        layer_range: [0, {layers}]
      - model: {finetune}
        layer_range: [0, {layers}]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
"""


def build_inputs() -> tuple[Path, Path]:
    """Build the base model (with its trained tokenizer) and a fine-tune of it."""
    base = MODELS_DIR / "base"
    finetune = MODELS_DIR / "finetune"
    start = time.perf_counter()
    make_model("llama", base, seed=0, num_layers=NUM_LAYERS)
    make_finetune(base, finetune, seed=1, noise=0.01)
    print(f"built {base} and {finetune} in {time.perf_counter() - start:.2f}s")
    return base, finetune


def write_config(base: Path, finetune: Path) -> Path:
    # Absolute paths, so the config means the same thing whatever directory it is resolved from.
    text = CONFIG_TEMPLATE.format(base=base.resolve(), finetune=finetune.resolve(), layers=NUM_LAYERS)
    CONFIG_PATH.write_text(text)
    print(f"wrote {CONFIG_PATH}")
    return CONFIG_PATH


def run_merge(config: Path) -> None:
    cmd = [sys.executable, "-m", "mergesmith", "yaml", str(config), str(MERGED_DIR), "--overwrite"]
    print("$ " + " ".join(["mergesmith", *cmd[3:]]))
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        sys.exit(f"demo failed: mergesmith exited with status {result.returncode}")


def generate(merged: Path, fallback_tokenizer: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    tokenizer_dir = merged if (merged / "tokenizer_config.json").exists() else fallback_tokenizer
    if tokenizer_dir != merged:
        print(f"note: {merged} has no tokenizer; using the one from {fallback_tokenizer}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    prompt = "The old lighthouse keeper"
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        if not torch.isfinite(logits).all():
            sys.exit("demo failed: merged model produced non-finite logits")
        output = model.generate(
            **inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    text = tokenizer.decode(output[0], skip_special_tokens=True)
    print(f"prompt:     {prompt!r}")
    print(f"generation: {text!r}")


def main() -> None:
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    base, finetune = build_inputs()
    config = write_config(base, finetune)
    run_merge(config)
    generate(MERGED_DIR, fallback_tokenizer=base)
    print("demo ok: merged model loads and generates")


if __name__ == "__main__":
    main()
