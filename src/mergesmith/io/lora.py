"""PEFT LoRA adapters applied to a base model tensor by tensor, as its tensors are read.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (or `adapter_model.bin`,
read only through the safe pickle loader). For every targeted module `m` the adapter stores
`base_model.model.m.lora_A.weight` (r x in) and `...lora_B.weight` (out x r); the base tensor `m.weight`
becomes `W + scaling * B @ A` (transposed for fan_in_fan_out layers such as GPT-2's Conv1D), with
`scaling = alpha / r`, or `alpha / sqrt(r)` with `use_rslora`, `alpha` taken from `alpha_pattern` when a
pattern matches the module. Embedding LoRA (`lora_embedding_A/B`) adds `(B @ A).T`. Full tensors the
adapter stores (`modules_to_save`, trained biases, resized embeddings) replace the base's. The update is
computed in float32 row chunks and the result keeps the base tensor's dtype; nothing is ever materialised
beyond the tensor being read. Only torch, safetensors headers and json are used (no peft)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesmith._util import FLOAT_DTYPES
from mergesmith.errors import ModelError
from mergesmith.io.index import ShardIndex, TensorInfo, index_model_dir, read_safetensors_header
from mergesmith.io.outdir import copy_side_files, remove_stale_temps

if TYPE_CHECKING:
    import torch

    from mergesmith.io.read import ModelReader

log = logging.getLogger("mergesmith")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."
_CHUNK_ELEMENTS = 1 << 22  # rows are updated in chunks of about this many elements (16 MiB of float32)
MAX_LISTED = 12

# LoraConfig options whose adapters are not plain `W + s * B @ A` updates.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora: true) rescales each weight by a learned magnitude",
    "use_qalora": "QA-LoRA (use_qalora: true) is tied to a quantized base",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) only applies after its invocation "
    "tokens and cannot be merged into the weights",
    "arrow_config": "Arrow routing (arrow_config) mixes several adapters per token",
    "velora_config": "the VeLoRA variant (velora_config)",
    "monteclora_config": "the MonteCLoRA variant (monteclora_config)",
    "use_bdlora": "the block-diagonal LoRA variant (use_bdlora)",
    "kasa_config": "the KaSA variant (kasa_config)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "layer_replication": "layer replication (layer_replication) changes the model's layer stack",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}
# init_lora_weights values that change the base weights when training starts: the adapter fits the
# modified ("residual") base, unless it was converted when saved (then init_lora_weights is true).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")

_LINEAR_KEY = re.compile(
    r"(?P<mod>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)"
)
_EMBED_KEY = re.compile(r"(?P<mod>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?")


@dataclass(frozen=True)
class AdapterConfig:
    """What adapter_config.json says about how to apply the adapter."""

    path: Path  # the adapter_config.json file
    lora_alpha: float
    r: int
    use_rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: Any
    modules_to_save: list[str]
    init_lora_weights: Any

    def alpha_for(self, module: str) -> float:
        """The alpha of `module` (a module path such as `model.layers.0.self_attn.q_proj`), as peft picks it:
        the first alpha_pattern key that matches the end of the path, else lora_alpha."""
        key = _pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scaling(self, module: str, rank: int) -> float:
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def read_adapter_config(adapter_dir: Path) -> AdapterConfig:
    """Parse adapter_config.json; ModelError naming the file for anything that is not a plain LoRA."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        present = ", ".join(sorted(p.name for p in Path(adapter_dir).iterdir())[:10]) or "nothing"
        raise ModelError(
            f"LoRA adapter {adapter_dir}: {path} is missing, so this is not a PEFT adapter directory "
            f"(it holds {present})"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"LoRA adapter {adapter_dir}: cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"LoRA adapter {adapter_dir}: {path} is not a JSON object")
    peft_type = str(raw.get("peft_type") or "LORA")
    if peft_type.upper() != "LORA":
        raise ModelError(
            f"LoRA adapter {adapter_dir}: {path} has peft_type {peft_type!r}; only LORA adapters can be "
            "applied (merge other adapter types with peft's merge_and_unload and reference the result)"
        )
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if raw.get(key):
            raise ModelError(
                f"LoRA adapter {adapter_dir}: {path} sets {key}: {what}, which mergesmith cannot apply. "
                "Merge it with peft (merge_and_unload) and reference the merged model instead."
            )
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        log.warning(
            "LoRA adapter %s was initialised with %r, which changes the base weights: it is only correct "
            "on the residual base it was trained with (or convert it when saving with peft)",
            adapter_dir,
            init,
        )
    try:
        r = int(raw.get("r", 8))
        alpha = float(raw.get("lora_alpha", 8))
        rank_pattern = {str(k): int(v) for k, v in (raw.get("rank_pattern") or {}).items()}
        alpha_pattern = {str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()}
    except (TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"LoRA adapter {adapter_dir}: {path} has an invalid value: {exc}") from None
    for key in [*rank_pattern, *alpha_pattern]:
        try:
            re.compile(key)
        except re.error as exc:
            raise ModelError(
                f"LoRA adapter {adapter_dir}: {path}: pattern {key!r} is invalid ({exc})"
            ) from None
    return AdapterConfig(
        path=path,
        lora_alpha=alpha,
        r=r,
        use_rslora=bool(raw.get("use_rslora", False)),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=raw.get("target_modules"),
        modules_to_save=list(raw.get("modules_to_save") or []),
        init_lora_weights=init,
    )


def adapter_weights_file(adapter_dir: Path) -> Path:
    for name in ADAPTER_FILES:
        if (Path(adapter_dir) / name).is_file():
            return Path(adapter_dir) / name
    raise ModelError(
        f"LoRA adapter {adapter_dir}: no adapter weights found (expected {' or '.join(ADAPTER_FILES)})"
    )


def _adapter_index(adapter_dir: Path) -> ShardIndex:
    file = adapter_weights_file(adapter_dir)
    if file.suffix == ".safetensors":
        return ShardIndex(Path(adapter_dir), read_safetensors_header(file), "safetensors")
    from mergesmith.io.read import load_pickle_state

    state = load_pickle_state(file)
    tensors = {
        name: TensorInfo(name, file, str(t.dtype).removeprefix("torch."), tuple(t.shape))
        for name, t in state.items()
    }
    return ShardIndex(Path(adapter_dir), tensors, "pickle")


# ----------------------------------------------------------------------------------------- adapter layout


@dataclass
class _Pair:
    """The low-rank factors of one adapted module, by adapter tensor name."""

    module: str
    embedding: bool
    a: str | None = None
    b: str | None = None
    b_bias: str | None = None  # lora_bias: B's bias adds to the module's bias


@dataclass(frozen=True)
class Update:
    """How one base tensor changes: optionally replaced by a full adapter tensor, then a low-rank delta
    `scaling * B @ A` (`transposed`: its transpose) or, for a bias, `scaling * bias_of_B`."""

    target: str
    replace: str | None = None
    a: str | None = None
    b: str | None = None
    bias: str | None = None
    scaling: float = 1.0
    transposed: bool = False


@dataclass
class Adapter:
    """A parsed adapter directory: its config, its tensors and what they do, not yet tied to a base."""

    path: Path
    config: AdapterConfig
    index: ShardIndex
    pairs: dict[str, _Pair] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)  # module path + param -> adapter tensor

    def bind(self, base: ShardIndex) -> tuple[dict[str, Update], list[str]]:
        """Map every adapter tensor onto a base tensor; return the updates by base tensor name and the
        problems found (targets the base lacks, shape or dtype mismatches)."""
        names = set(base.tensors)
        problems: list[str] = []
        updates: dict[str, Update] = {}

        def target_of(wanted: str, key: str) -> str | None:
            found = _find_target(wanted, names)
            if found is None:
                problems.append(f"{key} targets {wanted}, which the base model does not have")
            return found

        for wanted, key in self.replacements.items():
            target = target_of(wanted, key)
            if target is None:
                continue
            have, info = base.tensors[target], self.index.tensors[key]
            if have.shape != info.shape:
                problems.append(
                    f"{key} replaces {target} with shape {list(info.shape)}, but the base's has "
                    f"{list(have.shape)} (adapters that resize the vocabulary are not supported)"
                )
                continue
            if (info.dtype in FLOAT_DTYPES) != (have.dtype in FLOAT_DTYPES):
                problems.append(f"{key} is {info.dtype} but {target} in the base is {have.dtype}")
                continue
            updates[target] = Update(target, replace=key)
        for module, pair in self.pairs.items():
            kind = "lora_embedding" if pair.embedding else "lora"
            if pair.a is None or pair.b is None:
                missing = f"{kind}_A" if pair.a is None else f"{kind}_B"
                problems.append(f"module {module} has no {missing} tensor in the adapter")
                continue
            a, b = self.index.tensors[pair.a], self.index.tensors[pair.b]
            if len(a.shape) != 2 or len(b.shape) != 2:
                problems.append(
                    f"module {module}: only linear and embedding LoRA can be applied, but its factors have "
                    f"shapes {list(a.shape)} and {list(b.shape)} (convolution LoRA is not supported)"
                )
                continue
            if b.shape[1] != a.shape[0] or a.shape[0] == 0:
                problems.append(
                    f"module {module}: {kind}_A {list(a.shape)} and {kind}_B {list(b.shape)} do not share a rank"
                )
                continue
            target = target_of(f"{module}.weight", pair.a)
            if target is None:
                continue
            have = base.tensors[target]
            if have.dtype not in FLOAT_DTYPES:
                problems.append(f"{target} is {have.dtype} in the base; LoRA can only update float tensors")
                continue
            straight, flipped = (b.shape[0], a.shape[1]), (a.shape[1], b.shape[0])
            if pair.embedding:
                transposed = True
            else:
                # peft sets fan_in_fan_out per layer type (Conv1D: on, Linear: off); the shapes tell.
                transposed = self.config.fan_in_fan_out
                if (flipped if transposed else straight) != have.shape and (
                    straight if transposed else flipped
                ) == have.shape:
                    transposed = not transposed
            expected = flipped if transposed else straight
            if have.shape != expected:
                problems.append(
                    f"module {module}: the adapter's update has shape {list(expected)} but {target} has "
                    f"{list(have.shape)}"
                )
                continue
            scaling = self.config.scaling(module, a.shape[0])
            prev = updates.get(target)
            updates[target] = Update(
                target,
                replace=prev.replace if prev else None,
                a=pair.a,
                b=pair.b,
                scaling=scaling,
                transposed=transposed,
            )
            if pair.b_bias is not None:
                bias_target = target_of(f"{module}.bias", pair.b_bias)
                if bias_target is None:
                    continue
                if base.tensors[bias_target].shape != self.index.tensors[pair.b_bias].shape:
                    problems.append(
                        f"{pair.b_bias} has shape {list(self.index.tensors[pair.b_bias].shape)} but "
                        f"{bias_target} has {list(base.tensors[bias_target].shape)}"
                    )
                    continue
                prev = updates.get(bias_target)
                updates[bias_target] = Update(
                    bias_target, replace=prev.replace if prev else None, bias=pair.b_bias, scaling=scaling
                )
        return updates, problems


def _find_target(wanted: str, names: set[str]) -> str | None:
    """The base tensor an adapter module path names: exact, else the one name that ends with it (or that
    it ends with), which covers adapters trained on the inner model (no `model.` prefix) and the reverse."""
    if wanted in names:
        return wanted
    hits = [n for n in names if n.endswith("." + wanted) or wanted.endswith("." + n)]
    return hits[0] if len(hits) == 1 else None


def _strip_wrappers(name: str) -> list[str]:
    """Candidate base names for a full tensor stored by the adapter (peft wrapper segments removed)."""
    parts = [p for p in name.split(".") if p != "base_layer"]
    if "modules_to_save" not in parts:
        return [".".join(parts)]
    i = parts.index("modules_to_save")
    out = [".".join(parts[:i] + parts[i + 1 :])]
    if i + 2 < len(parts):  # `modules_to_save.<adapter name>.weight`
        out.insert(0, ".".join(parts[:i] + parts[i + 2 :]))
    return out


def load_adapter(adapter_dir: Path) -> Adapter:
    """Read an adapter directory's config and tensor headers (no tensor data for safetensors)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ModelError(f"LoRA adapter directory {adapter_dir} does not exist")
    config = read_adapter_config(adapter_dir)
    index = _adapter_index(adapter_dir)
    file = adapter_weights_file(adapter_dir)
    adapter = Adapter(adapter_dir, config, index)
    adapter_names: set[str] = set()
    unknown: list[str] = []
    for key in index.tensors:
        name = key.removeprefix(_PEFT_PREFIX)
        if "lora_magnitude_vector" in name:
            raise ModelError(
                f"LoRA adapter {adapter_dir}: {file} holds DoRA magnitude vectors ({key}); DoRA adapters "
                "cannot be applied. Merge it with peft (merge_and_unload) and reference the merged model."
            )
        m = _LINEAR_KEY.fullmatch(name) or _EMBED_KEY.fullmatch(name)
        if m is not None:
            kind = m["kind"]
            pair = adapter.pairs.setdefault(m["mod"], _Pair(m["mod"], kind.startswith("lora_embedding")))
            if pair.embedding != kind.startswith("lora_embedding"):
                unknown.append(key)
                continue
            if m["adapter"]:
                adapter_names.add(m["adapter"])
            if kind.endswith("B") and m.groupdict().get("param") == "bias":
                pair.b_bias = key
            elif kind.endswith("A") and m.groupdict().get("param", "weight") == "weight":
                pair.a = key
            elif kind.endswith("B"):
                pair.b = key
            else:
                unknown.append(key)
            continue
        parts = name.split(".")
        if (
            any(p.startswith("lora_") for p in parts)
            or "token_adapter" in parts
            or "original_module" in parts
        ):
            unknown.append(key)
            continue
        adapter.replacements[_strip_wrappers(name)[0]] = key
    if len(adapter_names) > 1:
        raise ModelError(
            f"LoRA adapter {adapter_dir}: {file} holds several adapters ({', '.join(sorted(adapter_names))}); "
            "save the one to apply on its own"
        )
    if unknown:
        listed = ", ".join(unknown[:MAX_LISTED]) + (
            f" and {len(unknown) - MAX_LISTED} more" if len(unknown) > MAX_LISTED else ""
        )
        raise ModelError(
            f"LoRA adapter {adapter_dir}: {file} holds tensors mergesmith does not know how to apply: {listed}"
        )
    if not adapter.pairs and not adapter.replacements:
        raise ModelError(f"LoRA adapter {adapter_dir}: {file} holds no LoRA tensors")
    return adapter


def bind_adapter(adapter_dir: Path, base: ShardIndex) -> tuple[Adapter, dict[str, Update]]:
    """Load an adapter and tie it to a base model's tensors; ModelError listing every mismatch."""
    adapter = load_adapter(adapter_dir)
    # A replacement may be stored under a wrapper name (`modules_to_save.default`); pick what the base has.
    names = set(base.tensors)
    for wanted, key in list(adapter.replacements.items()):
        cands = _strip_wrappers(key.removeprefix(_PEFT_PREFIX))
        hit = next((c for c in cands if _find_target(c, names) is not None), None)
        if hit is not None and hit != wanted:
            del adapter.replacements[wanted]
            adapter.replacements[hit] = key
    updates, problems = adapter.bind(base)
    if problems:
        shown = problems[:MAX_LISTED]
        more = len(problems) - len(shown)
        text = "\n".join(f"    {p}" for p in shown) + (f"\n    ... and {more} more" if more > 0 else "")
        raise ModelError(
            f"LoRA adapter {adapter_dir} does not fit the base model at {base.root} "
            f"({len(problems)} problem{'s' if len(problems) > 1 else ''}; was it trained on this base?):\n{text}"
        )
    return adapter, updates


# ----------------------------------------------------------------------------------------------- reading


class LoraReader:
    """Reads a base model's tensors with an adapter applied. Offers what ModelReader offers (`index`,
    `read`, `read_range`, `close`); the index is the base's (shapes and dtypes do not change)."""

    def __init__(self, base: ModelReader, adapter: Adapter, updates: dict[str, Update]) -> None:
        from mergesmith.io.read import ModelReader

        self.base = base
        self.index = base.index
        self.adapter = adapter
        self.updates = updates
        self._factors = ModelReader(adapter.index)
        self._owned = base.index.format == "safetensors"  # base reads return fresh tensors

    def read(self, name: str, rows: int | None = None) -> torch.Tensor:
        """Tensor `name` with the adapter applied; with `rows`, only its first rows."""
        info = self.index.tensors.get(name)
        upd = self.updates.get(name)
        if upd is None or info is None:
            return self.base.read(name, rows)
        if not info.shape:
            return self._apply(upd, info, 0, 0)
        stop = info.shape[0] if rows is None else min(rows, info.shape[0])
        return self._apply(upd, info, 0, stop)

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (dim 0) with the adapter applied."""
        info = self.index.tensors.get(name)
        upd = self.updates.get(name)
        if upd is None or info is None:
            return self._base_rows(name, start, stop)
        stop = min(stop, info.shape[0])
        return self._apply(upd, info, start, max(start, stop))

    def close(self) -> None:
        self._factors.close()
        self.base.close()

    def _base_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if start == 0:
            return self.base.read(name, stop)
        if self.base.index.format == "safetensors" and hasattr(self.base, "read_range"):
            return self.base.read_range(name, start, stop)
        return self.base.read(name)[start:stop]

    def _factor(self, key: str, work: torch.dtype) -> torch.Tensor:
        return self._factors.read(key).to(work)

    def _apply(self, upd: Update, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        import torch

        dtype = getattr(torch, info.dtype)
        whole = not info.shape
        if upd.replace is not None:
            src = self._factors.read(upd.replace)
            t = src if whole else src[start:stop]
            owned = self.adapter.index.format == "safetensors" or t.dtype != dtype
            t = t.to(dtype)
        else:
            t = self.base.read(info.name) if whole else self._base_rows(info.name, start, stop)
            owned = self._owned
        if upd.a is None and upd.bias is None:
            return t if owned else t.clone()
        if not owned:
            t = t.clone()
        work = torch.float64 if dtype == torch.float64 else torch.float32  # LoRA math never below float32
        with torch.no_grad():
            if upd.bias is not None:
                bias = self._factor(upd.bias, work)
                part = bias if whole else bias[start:stop]
                t.copy_(t.to(work).add_(part, alpha=upd.scaling))
                return t
            assert upd.a is not None and upd.b is not None
            a, b = self._factor(upd.a, work), self._factor(upd.b, work)
            n = t.shape[0]
            cols = max(1, t.numel() // max(1, n))
            step = max(1, _CHUNK_ELEMENTS // cols)
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                seg = t[lo:hi]
                acc = seg.to(work)
                if upd.transposed:  # rows of (B @ A).T are columns of A
                    acc.addmm_(a[:, start + lo : start + hi].T, b.T, alpha=upd.scaling)
                else:
                    acc.addmm_(b[start + lo : start + hi], a, alpha=upd.scaling)
                if acc.data_ptr() != seg.data_ptr():
                    seg.copy_(acc)
        return t


def open_lora_model(base: ModelReader, adapter_dir: Path) -> LoraReader:
    """A reader of `base` with the adapter at adapter_dir applied (checked against the base first)."""
    adapter, updates = bind_adapter(adapter_dir, base.index)
    return LoraReader(base, adapter, updates)


# ------------------------------------------------------------------------------------ --lora-merge-cache


def cache_key(base: Path, adapter: Path, revisions: tuple[str | None, str | None] = (None, None)) -> str:
    """A digest of what a merged copy depends on: both directories (resolved; hub snapshots carry the
    commit), the revisions asked for, and the size and mtime of every file of both."""

    def files(d: Path) -> list[tuple[str, int, int]]:
        out = []
        for f in sorted(d.iterdir()):
            if f.is_file():
                st = f.stat()
                out.append((f.name, st.st_size, st.st_mtime_ns))
        return out

    data = {
        "v": 1,
        "base": str(Path(base).resolve()),
        "base_revision": revisions[0],
        "adapter": str(Path(adapter).resolve()),
        "adapter_revision": revisions[1],
        "base_files": files(Path(base)),
        "adapter_files": files(Path(adapter)),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def merged_copy(
    base: Path,
    adapter: Path,
    cache_root: Path,
    revisions: tuple[str | None, str | None] = (None, None),
    label: str = "",
) -> Path:
    """The directory of `base` with `adapter` merged in, under cache_root: reused when an entry with the
    same key exists, else written (safetensors shards + config.json + the base's small files) and kept."""
    key = cache_key(base, adapter, revisions)
    short = "+".join(
        _short_name(p) for p in (label or f"{Path(base).name}+{Path(adapter).name}").split("+", 1)
    )
    slug = re.sub(r"[^A-Za-z0-9._+@-]+", "_", short).strip("._")
    entry = Path(cache_root).expanduser() / f"{slug[:80]}-{key[:16]}"
    if (entry / "config.json").is_file():
        log.info("LoRA merge cache: reusing %s", entry)
        return entry
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(
            f"cannot create the LoRA merge cache {entry.parent}: {exc.strerror or exc}"
        ) from None
    log.info("LoRA merge cache: merging %s into %s -> %s", adapter, base, entry)
    remove_stale_temps(entry)  # left by killed runs
    tmp = entry.parent / f".{entry.name}.mergesmith-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _build_merged_copy(Path(base), Path(adapter), tmp)
        (tmp / ".mergesmith-lora.json").write_text(  # hidden: never copied on as a side file
            json.dumps({"base": str(base), "adapter": str(adapter), "key": key}, indent=2) + "\n"
        )
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / "config.json").is_file():  # another run finished the same entry first: use it
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"cannot write the LoRA merge cache entry {entry}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry


def _short_name(text: str) -> str:
    """`org/name@rev` -> `org--name@rev`; a local path -> its last component."""
    path, _, rev = text.partition("@")
    parts = [p for p in path.split("/") if p not in ("", ".", "..", "~")]
    hub = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    name = "--".join(parts) if hub else (parts[-1] if parts else "model")
    return name + (f"@{rev}" if rev else "")


MAX_CACHE_SHARD = 4 * 1024**3


def _build_merged_copy(base: Path, adapter: Path, out: Path) -> None:
    """Write base + adapter into `out` tensor by tensor, as a normal safetensors model directory."""
    from mergesmith.io.read import ModelReader
    from mergesmith.io.write import OutEntry, ShardWriter, layout_shards

    index = index_model_dir(base)
    reader = open_lora_model(ModelReader(index), adapter)
    try:
        entries = [OutEntry(t.name, t.dtype, t.shape) for t in index.tensors.values()]
        writer = ShardWriter(out, layout_shards(entries, MAX_CACHE_SHARD))
        try:
            for e in entries:
                writer.write(e.name, reader.read(e.name))
            writer.finish()
        except BaseException:
            writer.abort()
            raise
    finally:
        reader.close()
    copy_side_files(base, out, True)
    shutil.copyfile(base / "config.json", out / "config.json")
