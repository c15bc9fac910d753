"""Throughput and peak memory of `mergesmith yaml` on ~1.1B-parameter Llama-shaped models, against the I/O floor.

Usage:
  python bench/bench_merge.py [--workdir DIR] [--layers 22] [--cases linear ties ...] [--repeat N]
                              [--mergekit-venv VENV]

The models (a base and two fine-tunes = base + noise, bf16, sharded safetensors) are generated once into
--workdir without instantiating a transformers model. For each case the I/O floor is the time to read every
input byte from the warm page cache plus the time to write the output's bytes; mergesmith's wall time is
reported as a ratio to it, with GB/s and peak RSS. `start s` is the same command with --dry-run (imports and
planning, a fixed cost whatever the model size) and `x excl` the ratio to the floor without it. With --mergekit-venv (or MERGEKIT_VENV) the same configs
run through that mergekit install too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HIDDEN, INTER, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 32, 4


def llama_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    head_dim = HIDDEN // HEADS
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV_HEADS * head_dim, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV_HEADS * head_dim, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "mlp.gate_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
        ]
    out += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return out


def config_json(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }


def build_model(out: Path, layers: int, seed: int, base: Path | None) -> None:
    """Write a bf16 model: random (base is None) or base + small noise, tensor by tensor."""
    from mergesmith.io.index import index_model_dir
    from mergesmith.io.read import ModelReader
    from mergesmith.io.write import OutEntry, ShardWriter, layout_shards

    if (out / "model.safetensors.index.json").exists():
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = llama_shapes(layers)
    writer = ShardWriter(tmp, layout_shards([OutEntry(n, "bfloat16", s) for n, s in shapes], 2 * 10**9))
    reader = ModelReader(index_model_dir(base)) if base else None
    gen = torch.Generator().manual_seed(seed)
    for name, shape in shapes:
        if reader is None:
            t = torch.ones(shape) if "norm" in name else torch.randn(shape, generator=gen) * 0.02
        else:
            t = reader.read(name).float() + torch.randn(shape, generator=gen) * 0.002
        writer.write(name, t.to(torch.bfloat16))
    writer.finish()
    (tmp / "config.json").write_text(json.dumps(config_json(layers), indent=2))
    tmp.rename(out)


def cases(w: Path, layers: int) -> dict[str, str]:
    base, a, b = w / "base", w / "ft1", w / "ft2"
    two = f"  - model: {a}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
    lo, hi = (layers * 16) // 22, (layers * 6) // 22
    return {
        "linear": f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n"
        f"  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: 1}}\ndtype: bfloat16\n",
        "ties": f"merge_method: ties\nbase_model: {base}\nmodels:\n{two}dtype: bfloat16\n",
        "dare_ties": f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n{two}dtype: bfloat16\n",
        "slerp": f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\n"
        "parameters: {t: 0.4}\ndtype: bfloat16\n",
        "della": f"merge_method: della\nbase_model: {base}\nmodels:\n{two}parameters: {{epsilon: 0.1}}\ndtype: bfloat16\n",
        "passthrough": f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0, {lo}]\n"
        f"  - sources:\n      - model: {b}\n        layer_range: [{hi}, {layers}]\ndtype: bfloat16\n",
    }


def input_files(cfg_text: str) -> list[Path]:
    import yaml

    cfg = yaml.safe_load(cfg_text)
    dirs = {cfg.get("base_model")} | {m["model"] for m in cfg.get("models", [])}
    dirs |= {s["model"] for sl in cfg.get("slices", []) for s in sl["sources"]}
    return sorted(f for d in dirs if d for f in Path(d).glob("*.safetensors"))


def read_floor(files: list[Path]) -> tuple[float, int]:
    for f in files:  # warm the page cache first
        subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL, check=True)
    os.sync()
    t0 = time.perf_counter()
    for f in files:
        subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0, sum(f.stat().st_size for f in files)


def write_floor(nbytes: int, where: Path) -> float:
    buf = bytearray(64 * 2**20)
    target = where / "floor.bin"
    os.sync()
    t0 = time.perf_counter()
    with open(target, "wb") as fh:
        left = nbytes
        while left > 0:
            n = min(left, len(buf))
            fh.write(memoryview(buf)[:n])
            left -= n
    elapsed = time.perf_counter() - t0
    target.unlink()
    return elapsed


def run(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in GB and exit status of a child process."""
    os.sync()  # start with no dirty pages from the previous step being written back meanwhile
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        sys.stderr.write(proc.stderr.read().decode()[-2000:] if proc.stderr else "")
    return wall, usage.ru_maxrss / 1e6, status


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/mergesmith-bench"))
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--cases", nargs="*")
    ap.add_argument("--mergekit-venv", default=os.environ.get("MERGEKIT_VENV"))
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs for the floor and mergesmith")
    ap.add_argument("--extra-args", default="", help="extra flags for mergesmith, e.g. '--max-memory 2GB'")
    args = ap.parse_args()
    w = Path(args.workdir) / f"llama-{args.layers}L"
    t0 = time.perf_counter()
    build_model(w / "base", args.layers, 0, None)
    build_model(w / "ft1", args.layers, 1, w / "base")
    build_model(w / "ft2", args.layers, 2, w / "base")
    print(f"models ready in {w} ({time.perf_counter() - t0:.0f}s)")
    print(
        f"{'case':<12} {'in GB':>6} {'out GB':>6} {'floor s':>8} {'wall s':>7} {'x floor':>7} {'start s':>7} "
        f"{'x excl':>7} {'GB/s':>6} {'RSS GB':>6}"
        + ("  mergekit s  RSS GB  speedup  RSS ratio" if args.mergekit_venv else "")
    )
    for name, text in cases(w, args.layers).items():
        if args.cases and name not in args.cases:
            continue
        cfg = w / f"{name}.yml"
        cfg.write_text(text)
        files = input_files(text)
        out = w / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "mergesmith", "yaml", str(cfg), str(out), "-q", "--random-seed", "1"]
        # With --repeat N the times are the best of N runs (floor included), peak RSS the worst; mergekit
        # runs once.
        floor = startup = wall = float("inf")
        rss = 0.0
        status = 0
        for _ in range(args.repeat):
            rfloor, nin = read_floor(files)
            startup = min(startup, run([*cmd, "--dry-run"])[0])  # imports + planning: a fixed cost
            shutil.rmtree(out, ignore_errors=True)
            w1, r1, status = run(cmd + args.extra_args.split())
            if status != 0:
                break
            wall, rss = min(wall, w1), max(rss, r1)  # peak RSS: the worst run
            nout = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            floor = min(floor, rfloor + write_floor(nout, w))
        if status != 0:
            print(f"{name:<12} FAILED")
            continue
        line = (
            f"{name:<12} {nin / 1e9:>6.2f} {nout / 1e9:>6.2f} {floor:>8.2f} {wall:>7.2f} {wall / floor:>7.2f} "
            f"{startup:>7.2f} {(wall - startup) / floor:>7.2f} {(nin + nout) / 1e9 / wall:>6.2f} {rss:>6.2f}"
        )
        shutil.rmtree(out, ignore_errors=True)
        if args.mergekit_venv:
            mk_out = w / f"mk-{name}"
            shutil.rmtree(mk_out, ignore_errors=True)
            mk = [
                str(Path(args.mergekit_venv) / "bin" / "mergekit-yaml"),
                str(cfg),
                str(mk_out),
                "--random-seed",
                "1",
            ]
            mwall, mrss, mstatus = run(mk)
            shutil.rmtree(mk_out, ignore_errors=True)
            line += (
                f"  {mwall:>10.2f}  {mrss:>6.2f}  {mwall / wall:>6.2f}x  {rss / mrss:>8.2f}"
                if mstatus == 0
                else "  mergekit failed"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
