"""The merged vocabulary of a run: the output tokenizer, per-model permutations, token overrides."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mergesmith.config.ref import ModelRef
from mergesmith.config.schema import ModelTokenSource, TokenEmbedding, ZeroTokenSource
from mergesmith.errors import PlanError
from mergesmith.tokenizer.build import (
    TokenizerInput,
    _reason,
    config_vocab_size,
    load_tokenizer,
    strip_tokenizer,
    union_tokenizer,
)
from mergesmith.tokenizer.embed import COPY, MEAN, ZERO, VocabAligner

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class _Override:
    """One entry of `tokenizer.tokens`, resolved against the output vocabulary and the inputs."""

    token: str
    out_id: int
    force: bool
    kind: str  # "default" (no source given), "zero", "model" (same token of a model), "row" (a model's row)
    model: int | None = None  # input index of the source model
    model_name: str = ""
    row: int | None = None  # for "row": the row in that model
    error: str | None = None  # why the source cannot be used (raised only if the token needs it)


@dataclass(eq=False)
class Vocabulary:
    """The output vocabulary and, for every input model, the row of each output token in its embeddings."""

    tokenizer: Any  # the output tokenizer (transformers), saved in place of the donor's files
    size: int  # tokens in the output vocabulary
    rows: int  # rows of every vocabulary tensor: size, padded to pad_to_multiple_of
    perms: list[torch.Tensor]  # per input model: LongTensor [size], row in that model or -1
    names: list[str]
    config_sizes: list[int | None]  # per input model: vocab_size from its config.json, if any
    overrides: list[_Override] = field(default_factory=list)
    source: str = "union"

    def describe(self) -> str:
        padded = f", padded to {self.rows} rows" if self.rows != self.size else ""
        return f"{self.source}: {self.size} tokens{padded}"

    def indexes(self, models: Sequence[int], rows: Sequence[int]) -> bool:
        """Whether a tensor with these row counts is indexed by token: unless no source's rows equal its
        model's vocab_size (e.g. a per-layer embedding table of another size), it is."""
        known = [(r, self.config_sizes[m]) for m, r in zip(models, rows) if self.config_sizes[m]]
        return not known or any(r == size for r, size in known)

    def aligner(
        self,
        tensor: str,
        sources: Sequence[int],
        rows: Sequence[int],
        base: int | None,
        dtype: str,
        warnings: list[str] | None = None,
    ) -> VocabAligner:
        """The aligner of one output tensor whose sources are the input models `sources` (in order), whose
        tensors have `rows` rows each. Raises PlanError when a token override cannot be served."""
        import torch

        n = len(sources)
        perms = []
        for m, r in zip(sources, rows):
            p = self.perms[m]
            if p.numel() and int(p.max()) >= r:  # ids the tensor has no row for count as missing
                p = torch.where(p < r, p, torch.full_like(p, -1))
            perms.append(p)
        present = torch.stack([p >= 0 for p in perms])  # [n, size]
        count = present.sum(0)
        forced = torch.tensor(sorted({o.out_id for o in self.overrides if o.force}), dtype=torch.long)
        need = count < n
        need[forced] = True
        fill = need.nonzero().squeeze(1)
        c = count[fill]
        have = present[:, fill]
        kind = torch.full((fill.numel(),), MEAN, dtype=torch.int8)
        src = torch.full((fill.numel(),), -1, dtype=torch.long)
        one = c == 1
        kind[one] = COPY
        src[one] = have.long().argmax(0)[one]
        if base is not None and base in sources:
            pos = list(sources).index(base)
            from_base = (c >= 2) & have[pos]
            kind[from_base] = COPY
            src[from_base] = pos
        kind[c == 0] = ZERO
        stacked = torch.stack(perms)[:, fill]
        row = torch.where(src >= 0, stacked.gather(0, src.clamp(min=0).unsqueeze(0)).squeeze(0), -1)
        overridden = set()
        for o in self.overrides:
            if not bool(need[o.out_id]):
                continue  # every source has it and it is not forced: its own rows are used
            overridden.add(o.out_id)
            j = int(torch.searchsorted(fill, torch.tensor([o.out_id]))[0])
            if o.kind == "default":
                continue
            if o.kind == "zero":
                kind[j], src[j], row[j] = ZERO, -1, -1
                continue
            where = f"tokenizer.tokens[{o.token!r}]"
            if o.error:
                raise PlanError(f"{where}: {o.error}")
            if o.model not in sources:
                raise PlanError(
                    f"{where}: the embedding comes from model {o.model_name}, which is not an input of tensor "
                    f"{tensor!r}; name one of its inputs"
                )
            pos = list(sources).index(o.model)
            r = int(perms[pos][o.out_id]) if o.kind == "model" else o.row
            if r is None or r < 0:
                raise PlanError(f"{where}: model {o.model_name} does not have token {o.token!r}")
            if r >= rows[pos]:
                raise PlanError(
                    f"{where}: row {r} is out of range for {tensor!r} of model {o.model_name} ({rows[pos]} rows)"
                )
            kind[j], src[j], row[j] = COPY, pos, r
        nowhere = int(
            ((c == 0) & ~torch.isin(fill, torch.tensor(sorted(overridden), dtype=torch.long))).sum()
        )
        if nowhere and warnings is not None:
            warnings.append(
                f"{tensor}: {nowhere} token(s) of the output vocabulary are in none of its input models; "
                "their rows are zero"
            )
        trivial = (
            fill.numel() == 0
            and self.rows == self.size
            and all(r == self.size for r in rows)
            and all(bool(torch.equal(p, torch.arange(self.size))) for p in perms)
        )
        return VocabAligner(
            tensor, self.size, self.rows, dtype, tuple(perms), forced, fill, kind, src, row, trivial
        )


def build_vocabulary(
    source: str | ModelRef,
    tokens: dict[str, TokenEmbedding] | None,
    pad_to_multiple_of: int | None,
    inputs: Sequence[TokenizerInput],
    base: int,
    resolve_dir: Any,
    warnings: list[str],
) -> Vocabulary:
    """Build the output tokenizer and the permutations (see tokenizer/build.py for the rules).

    inputs are the merge's models in plan order; base indexes the base model (the first model without one);
    resolve_dir(ref) gives the directory of a tokenizer source that is not an input."""
    import torch

    names = [str(m.ref) for m in inputs]
    toks: list[Any] = []
    for i, m in enumerate(inputs):
        try:
            toks.append(load_tokenizer(m.path))
        except Exception as exc:
            if i == base:
                raise PlanError(
                    f"cannot load the tokenizer of base model {m.ref} ({m.path}): {_reason(exc)}"
                ) from None
            warnings.append(
                f"cannot load the tokenizer of {m.ref} ({_reason(exc)}); assuming it is the same as {names[base]}'s"
            )
            toks.append(None)
    sizes = [
        config_vocab_size(m.config) or (len(t.get_vocab()) if t is not None else None)
        for m, t in zip(inputs, toks)
    ]
    base_size = sizes[base] or len(toks[base].get_vocab())
    toks[base] = strip_tokenizer(toks[base], base_size, f"base model {names[base]}")
    vocabs = [(t if t is not None else toks[base]).get_vocab() for t in toks]
    config_sizes = [config_vocab_size(m.config) for m in inputs]
    sizes = [s or base_size for s in sizes]

    if source == "union":
        others = [
            (names[i], toks[i], sizes[i]) for i in [base, *(j for j in range(len(inputs)) if j != base)]
        ]
        others = [o for o in others if o[1] is not None]
        out = union_tokenizer(toks[base], others)
        label = f"union of {len(others)} tokenizers"
    elif source == "base":
        out = toks[base]
        label = f"tokenizer of {names[base]}"
    else:
        ref = source if isinstance(source, ModelRef) else ModelRef.parse(source)
        idx = next((i for i, m in enumerate(inputs) if m.ref == ref), None)
        path = inputs[idx].path if idx is not None else resolve_dir(ref)
        try:
            out = load_tokenizer(path)
        except Exception as exc:
            raise PlanError(f"cannot load the tokenizer of {ref} ({path}): {_reason(exc)}") from None
        label = f"tokenizer of {ref}"
    existing = out.get_vocab()
    extra = [t for t in (tokens or {}) if t not in existing]
    if extra:
        out.add_tokens(extra)
    out_vocab = out.get_vocab()
    size = max(out_vocab.values()) + 1 if out_vocab else 0
    if size != len(out_vocab):
        warnings.append(
            f"the output tokenizer's ids have gaps ({len(out_vocab)} tokens, ids up to {size - 1})"
        )
    rows = size
    if pad_to_multiple_of and rows % pad_to_multiple_of:
        rows += pad_to_multiple_of - rows % pad_to_multiple_of

    tokens_list = list(out_vocab.items())
    new_ids = torch.tensor([i for _, i in tokens_list], dtype=torch.long)
    perms = []
    for vocab, limit in zip(vocabs, sizes):
        old = torch.tensor([vocab.get(t, -1) for t, _ in tokens_list], dtype=torch.long)
        old = torch.where(old < limit, old, torch.full_like(old, -1))
        perm = torch.full((size,), -1, dtype=torch.long)
        perm[new_ids] = old
        perms.append(perm)

    overrides = [_override(t, out_vocab[t], cfg, inputs, vocabs) for t, cfg in (tokens or {}).items()]
    return Vocabulary(out, size, rows, perms, names, config_sizes, overrides, label)


def _override(
    token: str,
    out_id: int,
    cfg: TokenEmbedding,
    inputs: Sequence[TokenizerInput],
    vocabs: list[dict[str, int]],
) -> _Override:
    src = cfg.source
    if src is None:
        return _Override(token, out_id, cfg.force, "default")
    if isinstance(src, ZeroTokenSource):
        return _Override(token, out_id, cfg.force, "zero")
    ref = src.model if isinstance(src, ModelTokenSource) else src
    idx = next((i for i, m in enumerate(inputs) if m.ref == ref), None)
    if idx is None:
        reason = f"model {ref} is not one of the merged models; name one of them"
        return _Override(token, out_id, cfg.force, "model", None, str(ref), error=reason)
    if not isinstance(src, ModelTokenSource):
        return _Override(token, out_id, cfg.force, "model", idx, str(ref))
    if src.token_id is not None:
        return _Override(token, out_id, cfg.force, "row", idx, str(ref), src.token_id)
    row = vocabs[idx].get(src.token) if src.token is not None else None
    if row is None:
        reason = f"model {ref}'s tokenizer has no token {src.token!r}"
        return _Override(token, out_id, cfg.force, "row", idx, str(ref), error=reason)
    return _Override(token, out_id, cfg.force, "row", idx, str(ref), row)
