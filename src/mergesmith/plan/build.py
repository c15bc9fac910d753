"""MergeConfig + model headers -> MergePlan. All name, shape, arity and parameter checks happen here,
before any tensor data is read; problems are collected and reported together."""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesmith._util import FLOAT_DTYPES
from mergesmith.config import params as P
from mergesmith.config.ref import ModelRef
from mergesmith.config.schema import MergeConfig, OutputSlice
from mergesmith.config.validate import parameter_blocks
from mergesmith.errors import MergesmithError, ModelError, PlanError
from mergesmith.io.index import ShardIndex, TensorInfo, index_model_dir
from mergesmith.io.lora import bind_adapter, merged_copy
from mergesmith.methods import registry
from mergesmith.methods.spec import MethodSpec
from mergesmith.models.layout import ModelLayout, Module, recognise
from mergesmith.models.patterns import TIED_HEADS, VOCAB_HINTS
from mergesmith.models.resolve import resolve, resolve_lora
from mergesmith.plan.outconfig import output_config, set_dtype, set_vocab_size, tokenizer_donor
from mergesmith.plan.types import InputModel, MergePlan, Source, TensorPlan

log = logging.getLogger("mergesmith")
MAX_LISTED = 8


@dataclass(frozen=True)
class PlanOptions:
    """The options that change the plan (the rest only change execution)."""

    allow_crimes: bool = False
    random_seed: int | None = None
    cache_dir: str | None = None
    lora_merge_cache: str | None = None  # keep base+adapter merges here and reuse them


@dataclass(frozen=True)
class _Src:
    model: int
    start: int
    end: int
    params: dict[str, Any] | None


@dataclass(frozen=True)
class _Slice:
    sources: tuple[_Src, ...]
    base: int | None
    params: dict[str, Any] | None


@dataclass
class _Loaded:
    ref: ModelRef
    path: Path
    config: dict[str, Any]
    index: ShardIndex
    layout: ModelLayout
    lora: Path | None = None


@dataclass
class _Builder:
    cfg: MergeConfig
    spec: MethodSpec
    opts: PlanOptions
    models: list[_Loaded]
    ids: dict[ModelRef, int]
    tensors: list[TensorPlan] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    used_names: set[str] = field(default_factory=set)
    crimes: list[str] = field(default_factory=list)  # tensors merged without every input (--allow-crimes)
    vocab_rows: int | None = None  # set when embeddings were truncated to a common vocabulary
    vocab: Any = None  # merged vocabulary (tokenizer settings): vocabulary tensors are re-indexed onto it

    # -- normalisation ---------------------------------------------------------------------------
    def slices_of(
        self, models: list | None, slices: list[OutputSlice] | None, module: Module | None
    ) -> list[_Slice]:
        cfg = self.cfg
        if models:
            srcs = []
            for m in models:
                idx = self.ids[m.model]
                srcs.append(_Src(idx, 0, self._depth(idx, module), m.parameters))
            base = self.ids[cfg.base_model] if cfg.base_model else None
            if base is not None and base not in [s.model for s in srcs]:
                srcs.append(_Src(base, 0, self._depth(base, module), None))
            depths = {s.end for s in srcs}
            if len(depths) > 1:
                listed = ", ".join(f"{self.models[s.model].ref} has {s.end}" for s in srcs)
                self.problems.append(
                    f"'models:' merges need models of equal depth, but {listed} layers; use slices"
                )
            return [_Slice(tuple(srcs), base, None)]
        out = []
        for i, s in enumerate(slices or []):
            srcs = []
            for j, src in enumerate(s.sources):
                idx = self.ids[src.model]
                depth = self._depth(idx, module)
                lo, hi = src.layer_range
                if hi > depth:
                    self.problems.append(
                        f"slices[{i}].sources[{j}].layer_range [{lo}, {hi}]: model {src.model} has only {depth} layers"
                    )
                srcs.append(_Src(idx, lo, min(hi, depth), src.parameters))
            base_ref = s.base_model or cfg.base_model
            out.append(_Slice(tuple(srcs), self.ids[base_ref] if base_ref else None, s.parameters))
        return out

    def _depth(self, idx: int, module: Module | None) -> int:
        mod = self._module(idx, module)
        return mod.num_layers

    def _module(self, idx: int, module: Module | None) -> Module:
        layout = self.models[idx].layout
        if module is None:
            return layout.main
        return next((m for m in layout.modules if m.prefix == module.prefix), layout.main)

    # -- tensors ---------------------------------------------------------------------------------
    def plan_module(
        self, sl: list[_Slice], module_params: dict[str, Any] | None, donor: int, module: Module
    ) -> int:
        if not sl:
            return 0
        layout = self.models[donor].layout
        owned = _owned_names(layout, module)
        for name in [n for n in layout.pre if n in owned]:
            self.plan_tensor(name, [(s, name) for s in sl[0].sources], sl[0], module_params, 0.0)
        out_layer = 0
        for s in sl:
            n = s.sources[0].end - s.sources[0].start
            for k in range(n):
                t = k / (n - 1) if n > 1 else 1.0
                first = s.sources[0]
                rests = self._module(first.model, module).layers[first.start + k]
                for rest in rests:
                    srcs = [
                        (src, self._module(src.model, module).name(src.start + k, rest)) for src in s.sources
                    ]
                    self.plan_tensor(module.name(out_layer, rest), srcs, s, module_params, t)
                out_layer += 1
        for name in [n for n in layout.post if n in owned]:
            self.plan_tensor(name, [(s, name) for s in sl[-1].sources], sl[-1], module_params, 0.0)
        return out_layer

    def plan_tensor(
        self, out_name: str, srcs: list[tuple[_Src, str]], sl: _Slice, module_params: dict | None, t: float
    ) -> None:
        found: list[tuple[_Src, TensorInfo]] = []
        missing: list[str] = []
        for src, name in srcs:
            info = self._find(src.model, name)
            if info is None:
                missing.append(str(self.models[src.model].ref))
            else:
                found.append((src, info))
        if missing:
            if out_name in TIED_HEADS and not found:
                return  # every input ties its head to the embeddings: so does the output
            if not self.opts.allow_crimes or not found:
                self.problems.append(f"tensor {out_name!r} is missing from {', '.join(missing)}")
                return
            self.crimes.append(out_name)
        shapes = {info.shape for _, info in found}
        rows: int | None = None
        aligned = self._vocab_aligned(out_name, found)
        if aligned:
            shapes = {(self.vocab.rows, *found[0][1].shape[1:])}
        if len(shapes) > 1:
            tails = {s[1:] for s in shapes}
            if any(h in out_name for h in VOCAB_HINTS) and len(tails) == 1:
                rows = min(s[0] for s in shapes)
                self.vocab_rows = rows if self.vocab_rows is None else min(rows, self.vocab_rows)
                self.warnings.append(
                    f"{out_name}: vocabularies differ ({sorted(s[0] for s in shapes)} rows); keeping the first "
                    f"{rows} rows of each model (set a tokenizer source to merge vocabularies properly)"
                )
            else:
                listed = ", ".join(f"{self.models[s.model].ref}: {list(i.shape)}" for s, i in found)
                self.problems.append(f"tensor {out_name!r} has different shapes across models ({listed})")
                return
        shape = found[0][1].shape if rows is None else (rows, *found[0][1].shape[1:])
        if aligned:
            shape = next(iter(shapes))
        dtypes = {info.dtype for _, info in found}
        if not dtypes <= FLOAT_DTYPES:
            self.tensors.append(
                TensorPlan(
                    out_name,
                    "copy",
                    tuple(Source(s.model, i.name) for s, i in found),
                    None,
                    (),
                    (),
                    shape,
                    found[0][1].dtype,
                    found[0][1].dtype,
                )
            )
            return
        compute = self.cfg.dtype or _promote(dtypes)
        out_dtype = self.cfg.out_dtype or compute
        self.used_names.update([out_name, *(i.name for _, i in found)])
        models = [s.model for s, _ in found]
        base_index = None
        if self.spec.base != "ignored" and sl.base is not None and sl.base in models:
            base_index = models.index(sl.base)
        shared_scopes = [sl.params, module_params, self.cfg.parameters]
        params: dict[str, Any] = {}
        per_model: list[dict[str, Any]] = [{} for _ in found]
        try:
            for p in self.spec.params:
                if p.scope == "global":
                    params[p.name] = self._resolve(p, shared_scopes, out_name, t, None)
                    continue
                for i, (src, info) in enumerate(found):
                    if p.scope == "non_base" and i == base_index:
                        continue
                    per_model[i][p.name] = self._resolve(
                        p, [src.params, *shared_scopes], info.name, t, src.model
                    )
            if self.spec.validate is not None:
                for msg in self.spec.validate(params, per_model):
                    self.problems.append(f"tensor {out_name!r}: {msg}")
        except _ParamMissing as exc:
            self.problems.append(str(exc))
            return
        seed = None
        if self.spec.random:
            seed = (
                zlib.crc32(f"{self.opts.random_seed}:{out_name}".encode())
                if self.opts.random_seed is not None
                else None
            )
        self.tensors.append(
            TensorPlan(
                name=out_name,
                method=self.spec.name,
                sources=tuple(Source(s.model, i.name, rows) for s, i in found),
                base_index=base_index,
                params=tuple(params.items()),
                per_model=tuple(tuple(d.items()) for d in per_model),
                shape=tuple(shape),
                compute_dtype=compute,
                out_dtype=out_dtype,
                seed=seed,
                vocab=self._aligner(out_name, found, sl, compute) if aligned else None,
            )
        )

    def _vocab_aligned(self, name: str, found: list[tuple[_Src, TensorInfo]]) -> bool:
        """With tokenizer settings, a vocabulary tensor is re-indexed onto the merged vocabulary."""
        if self.vocab is None or not any(h in name for h in VOCAB_HINTS):
            return False
        if len({i.shape[1:] for _, i in found}) != 1:
            return False
        return self.vocab.indexes([s.model for s, _ in found], [i.shape[0] for _, i in found])

    def _aligner(self, name: str, found: list[tuple[_Src, TensorInfo]], sl: _Slice, dtype: str) -> Any:
        try:
            models, rows = [s.model for s, _ in found], [i.shape[0] for _, i in found]
            return self.vocab.aligner(name, models, rows, sl.base, dtype, self.warnings)
        except PlanError as exc:
            self.problems.append(str(exc))
            return None

    def _find(self, model: int, name: str) -> TensorInfo | None:
        index = self.models[model].index
        if name in index:
            return index[name]
        for alias in TIED_HEADS.get(name, ()):
            if alias in index:
                return index[alias]
        return None

    def _resolve(self, p: Any, scopes: list, tensor: str, t: float, model: int | None) -> Any:
        try:
            ok, value = P.resolve(p.name, scopes, tensor, t, p.validate)
        except ValueError as exc:
            raise _ParamMissing(f"tensor {tensor!r}: parameter {exc}") from None
        if ok:
            return value
        if p.required:
            who = f" for model {self.models[model].ref}" if model is not None else ""
            raise _ParamMissing(
                f"merge method {self.spec.name!r} needs parameter {p.name!r}{who}, but no value (or no "
                f"matching filter) applies to tensor {tensor!r}"
            )
        return p.default


class _ParamMissing(Exception):
    pass


def _promote(dtypes: set[str]) -> str:
    """The floating dtype that holds every one of `dtypes` (torch's promotion: float16 with bfloat16 gives
    float32), without importing torch."""
    if len(dtypes) == 1:
        return next(iter(dtypes))
    if "float64" in dtypes:
        return "float64"
    return "float32"


def _owned_names(layout: ModelLayout, module: Module) -> set[str]:
    """Non-layer tensors that belong to `module`: those under its root, or all the others for the main one."""
    roots = {m.prefix: m.prefix.rsplit(".", 1)[0] if "." in m.prefix else "" for m in layout.modules}
    names = set(layout.pre) | set(layout.post)
    mine = set()
    for n in names:
        owner = max(
            (p for p, r in roots.items() if r and n.startswith(r + ".") and p != layout.main.prefix),
            key=lambda p: len(roots[p]),
            default=layout.main.prefix,
        )
        if owner == module.prefix:
            mine.add(n)
    return mine


def _load(ref: ModelRef, cache_dir: str | None, lora_cache: str | None = None) -> _Loaded:
    path = resolve(ref, cache_dir)
    lora = resolve_lora(ref, cache_dir)
    cfg_file = path / "config.json"
    try:
        config = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise ModelError(f"model {ref}: {cfg_file} is missing") from None
    except ValueError as exc:
        raise ModelError(f"model {ref}: {cfg_file} is not valid JSON ({exc})") from None
    index = index_model_dir(path)
    if lora is not None:
        bind_adapter(lora, index)  # every adapter tensor must fit a base tensor, before any data is read
        if lora_cache:
            revs = (ref.model.revision, ref.lora.revision if ref.lora else None)
            path, lora = merged_copy(path, lora, Path(lora_cache), revs, label=str(ref)), None
            index = index_model_dir(path)
    layout = recognise(index.names, config, where=f"model {ref}")
    return _Loaded(ref, path, config, index, layout, lora)


def _match_module(key: str, layout: ModelLayout) -> Module | None:
    """Find the block stack a `modules:` key names: its prefix, a decoder alias, or a substring of a prefix."""
    for m in layout.modules:
        if m.prefix == key:
            return m
    if key in ("text_decoder", "decoder", "language_model", "text", "default"):
        return layout.main
    return next((m for m in layout.modules if key in m.prefix), None)


def build_plan(cfg: MergeConfig, opts: PlanOptions | None = None) -> MergePlan:
    """Resolve every model, read headers, and lay out the whole merge; raise PlanError listing all problems."""
    opts = opts or PlanOptions()
    spec = registry.get(cfg.merge_method)
    refs = cfg.referenced_models()
    loaded: list[_Loaded] = []
    errors: list[str] = []
    for ref in refs:
        try:
            loaded.append(_load(ref, opts.cache_dir, opts.lora_merge_cache))
        except MergesmithError as exc:
            errors.append(str(exc))
    if errors:
        raise PlanError("cannot read the input models:\n" + "\n".join(f"  - {e}" for e in errors))
    b = _Builder(cfg, spec, opts, loaded, {m.ref: i for i, m in enumerate(loaded)})
    donor = b.ids[cfg.base_model] if cfg.base_model else 0
    donor_layout = loaded[donor].layout
    b.vocab, out_tokenizer = _plan_tokenizer(cfg, loaded, donor, opts, b.warnings)
    out_layers: dict[str, int] = {}
    slice_sources: list[tuple[int, int]] = []  # (model, layer) feeding each output layer of the main module
    if cfg.modules:
        for key, mod in cfg.modules.items():
            module = _match_module(key, donor_layout)
            if module is None:
                prefixes = ", ".join(m.prefix for m in donor_layout.modules)
                b.problems.append(
                    f"modules.{key}: no block stack of that name; the base model has: {prefixes}"
                )
                continue
            sl = b.slices_of(mod.models, mod.slices, module)
            if not b.problems:
                out_layers[module.prefix] = b.plan_module(sl, mod.parameters, donor, module)
                if module is donor_layout.main:
                    slice_sources = [
                        (s.sources[0].model, s.sources[0].start + k)
                        for s in sl
                        for k in range(s.sources[0].end - s.sources[0].start)
                    ]
    else:
        sl = b.slices_of(cfg.models, cfg.slices, None)
        if not b.problems:
            out_layers[donor_layout.main.prefix] = b.plan_module(sl, None, donor, donor_layout.main)
            slice_sources = [
                (s.sources[0].model, s.sources[0].start + k)
                for s in sl
                for k in range(s.sources[0].end - s.sources[0].start)
            ]
        if cfg.slices and any(s.residual_weight is not None for s in cfg.slices):
            b.warnings.append(
                "residual_weight is accepted for compatibility but has no effect (as in mergekit)"
            )
    _check_filters(cfg, b)
    _check_heads(b)
    if b.crimes:
        b.warnings.append(
            f"--allow-crimes: {len(b.crimes)} tensor(s) were merged from only the models that have them "
            f"(first: {', '.join(b.crimes[:3])})"
        )
    if b.problems:
        for w in b.warnings:  # they often explain the problems (e.g. a filter that matches nothing)
            log.warning(w)
        shown = b.problems[: MAX_LISTED * 3]
        more = len(b.problems) - len(shown)
        text = "\n".join(f"  - {p}" for p in shown) + (f"\n  ... and {more} more" if more > 0 else "")
        n = len(b.problems)
        raise PlanError(f"the merge cannot be planned ({n} problem{'s' if n > 1 else ''}):\n{text}")
    out_config = output_config(cfg, loaded, donor, out_layers.get(donor_layout.main.prefix), slice_sources)
    if b.vocab_rows is not None:
        set_vocab_size(out_config, b.vocab_rows)
    if b.vocab is not None:
        set_vocab_size(out_config, b.vocab.rows)
    seen: set[tuple[int, str]] = set()
    bytes_in = 0
    for tp in b.tensors:
        for s in tp.sources:
            if (s.model, s.name) not in seen:
                seen.add((s.model, s.name))
                bytes_in += loaded[s.model].index[s.name].nbytes
    set_dtype(out_config, cfg, b.tensors)
    for w in b.warnings:
        log.warning(w)
    models = tuple(InputModel(m.ref, m.path, m.config, m.lora) for m in loaded)
    return MergePlan(
        spec.name,
        models,
        tuple(b.tensors),
        out_config,
        donor,
        bytes_in,
        tuple(b.warnings),
        tokenizer=out_tokenizer,
        tokenizer_donor=tokenizer_donor(loaded, donor, b.vocab_rows),
    )


def _check_filters(cfg: MergeConfig, b: _Builder) -> None:
    for path, block, _level in parameter_blocks(cfg):
        for name, setting in block.items():
            for filt in P.filters_in(setting):
                if not any(filt in n for n in b.used_names):
                    where = ".".join(str(p) for p in path)
                    b.warnings.append(f"{where}.{name}: filter {filt!r} matches no tensor name")


def _plan_tokenizer(
    cfg: MergeConfig, loaded: list[_Loaded], base: int, opts: PlanOptions, warnings: list[str]
) -> tuple[Any, Any]:
    """The merged vocabulary and the output tokenizer for tokenizer/chat_template settings (else None, None)."""
    if cfg.tokenizer is None and cfg.tokenizer_source is None and cfg.chat_template is None:
        return None, None
    from mergesmith.tokenizer import TokenizerInput, plan_tokenizer

    inputs = [TokenizerInput(m.ref, m.path, m.config) for m in loaded]
    return plan_tokenizer(cfg, inputs, base, opts.cache_dir, warnings)


def _check_heads(b: _Builder) -> None:
    """Warn when an input's own output head is left out because the output ties it to the embeddings."""
    planned = {t.name for t in b.tensors}
    for head in TIED_HEADS:
        if head in planned:
            continue
        owners = [str(m.ref) for m in b.models if head in m.index]
        if owners:
            b.warnings.append(
                f"{head}: the base model ties its output head to the embeddings, so the untied heads of "
                f"{', '.join(owners)} are not merged (the output uses the merged embeddings as its head)"
            )
