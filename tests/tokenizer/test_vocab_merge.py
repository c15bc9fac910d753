"""Tokenizer merging: the output vocabulary, and embedding / head rows for every kind of token, checked
against plain formulas on the input tensors."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import load_tensors

from mergesmith import MergeOptions, run_merge
from mergesmith.api import plan_merge
from mergesmith.errors import PlanError

QUIET = MergeOptions(quiet=True)
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
IM_START, IM_END = 512, 513
CHAT = "<|im_start|>user\nThe quick brown fox<|im_end|>\n<|im_start|>assistant\n"
TEXT = "The old lighthouse keeper climbed the stairs every evening at dusk, 42 times."


def linear(models: list[tuple[Path, float]], base: Path | None = None, **top: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in models],
        "dtype": "float32",
    }
    if base is not None:
        cfg["base_model"] = str(base)
    cfg.update(top)
    return cfg


def tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def head_inputs_and_logits(out: Path, text: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the merged model on text: (input ids, hidden states entering the head, logits)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    enc = tokenizer(out)(text, return_tensors="pt")
    seen: dict[str, torch.Tensor] = {}

    def keep_input(module: Any, inputs: tuple, output: Any) -> None:
        seen["h"] = inputs[0]

    hook = model.get_output_embeddings().register_forward_hook(keep_input)
    with torch.no_grad():
        logits = model(**enc).logits
    hook.remove()
    return enc["input_ids"][0], seen["h"][0], logits[0]


def test_union_keeps_base_ids_and_takes_added_rows_from_the_model_that_has_them(tok_models, tmp_path):
    base, inst = tok_models["base"], tok_models["inst"]
    out = tmp_path / "out"
    run_merge(linear([(base, 0.6), (inst, 0.4)], base, tokenizer_source="union"), out, QUIET)

    tok, btok, itok = tokenizer(out), tokenizer(base), tokenizer(inst)
    vocab = tok.get_vocab()
    assert len(vocab) == 514
    assert {t: i for t, i in vocab.items() if i < 512} == btok.get_vocab()
    assert vocab["<|im_start|>"] == IM_START and vocab["<|im_end|>"] == IM_END
    assert tok.added_tokens_decoder[IM_START].special and tok.added_tokens_decoder[IM_END].special
    assert tok(TEXT)["input_ids"] == btok(TEXT)["input_ids"]
    assert tok(CHAT)["input_ids"] == itok(CHAT)["input_ids"]
    assert tok.decode(tok(CHAT)["input_ids"], skip_special_tokens=False).endswith(CHAT)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 514
    assert (out / "generation_config.json").is_file()

    o, b, i = load_tensors(out), load_tensors(base), load_tensors(inst)
    for name in (EMB, HEAD):
        assert o[name].shape == (514, 64)
        close(o[name][:512], 0.6 * b[name] + 0.4 * i[name][:512])
        close(o[name][512:], i[name][512:])  # base lacks them: inst's rows in both models

    ids, h, logits = head_inputs_and_logits(out, CHAT)
    assert IM_START in ids.tolist() and IM_END in ids.tolist()
    assert torch.isfinite(logits).all()
    close(logits[:, 512:], h @ i[HEAD][512:].T)  # the added tokens' logits come from inst's head rows
    close(logits[:, :512], h @ (0.6 * b[HEAD] + 0.4 * i[HEAD][:512]).T)


@pytest.mark.parametrize("base_key, size", [("inst", 514), ("base", 512)])
def test_base_source_uses_the_base_models_tokenizer(tok_models, tmp_path, base_key, size):
    base, inst = tok_models["base"], tok_models["inst"]
    out = tmp_path / "out"
    cfg = linear([(base, 0.5), (inst, 0.5)], tok_models[base_key], tokenizer={"source": "base"})
    run_merge(cfg, out, QUIET)
    assert tokenizer(out).get_vocab() == tokenizer(tok_models[base_key]).get_vocab()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == size
    o, b, i = load_tensors(out), load_tensors(base), load_tensors(inst)
    for name in (EMB, HEAD):
        assert o[name].shape == (size, 64)
        close(o[name][:512], 0.5 * b[name] + 0.5 * i[name][:512])
        if size == 514:
            close(o[name][512:], i[name][512:])


def test_model_source_and_the_mean_of_models_that_have_a_token(tok_models, tmp_path):
    """The base model lacks the chat tokens, two others have them: the base gets the mean of their rows."""
    base, inst, inst2 = tok_models["base"], tok_models["inst"], tok_models["inst2"]
    out = tmp_path / "out"
    cfg = linear([(base, 0.2), (inst, 0.3), (inst2, 0.5)], base, tokenizer={"source": str(inst)})
    run_merge(cfg, out, QUIET)
    assert tokenizer(out).get_vocab() == tokenizer(inst).get_vocab()
    o, b, i, j = load_tensors(out), load_tensors(base), load_tensors(inst), load_tensors(inst2)
    for name in (EMB, HEAD):
        close(o[name][:512], 0.2 * b[name] + 0.3 * i[name][:512] + 0.5 * j[name][:512])
        mean = (i[name][512:] + j[name][512:]) / 2
        close(o[name][512:], 0.2 * mean + 0.3 * i[name][512:] + 0.5 * j[name][512:])


def test_token_overrides_zero_force_and_new_tokens(tok_models, tmp_path):
    base, inst, inst2 = tok_models["base"], tok_models["inst"], tok_models["inst2"]
    tokens = {
        "<|im_start|>": {"source": {"kind": "model_token", "model": str(inst), "token": "<s>"}},
        "<|im_end|>": {"source": {"kind": "zero"}},
        "<s>": {"source": str(inst2), "force": True},
        "<|new|>": {"source": {"kind": "model_token", "model": str(base), "token_id": 7}},
        "<pad>": {"source": str(inst2)},  # every model has it and it is not forced: no effect
    }
    out = tmp_path / "out"
    cfg = linear(
        [(base, 0.2), (inst, 0.3), (inst2, 0.5)], base, tokenizer={"source": "union", "tokens": tokens}
    )
    run_merge(cfg, out, QUIET)
    vocab = tokenizer(out).get_vocab()
    assert len(vocab) == 515 and vocab["<|new|>"] == 514
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 515
    o, b, i, j = load_tensors(out), load_tensors(base), load_tensors(inst), load_tensors(inst2)
    for name in (EMB, HEAD):
        ob, ib, jb = b[name], i[name], j[name]
        close(o[name][IM_START], 0.2 * ib[1] + 0.3 * ib[IM_START] + 0.5 * jb[IM_START])
        close(o[name][IM_END], 0.3 * ib[IM_END] + 0.5 * jb[IM_END])
        close(o[name][1], jb[1])
        close(o[name][514], ob[7])
        close(o[name][3], 0.2 * ob[3] + 0.3 * ib[3] + 0.5 * jb[3])
        close(o[name][10:512], 0.2 * ob[10:] + 0.3 * ib[10:512] + 0.5 * jb[10:512])


def test_pad_to_multiple_of_pads_rows_with_each_models_mean(tok_models, tmp_path):
    base, inst = tok_models["base"], tok_models["inst"]
    out = tmp_path / "out"
    cfg = linear([(base, 0.6), (inst, 0.4)], base, tokenizer={"pad_to_multiple_of": 64})
    run_merge(cfg, out, QUIET)
    assert len(tokenizer(out)) == 514
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 576
    o, b, i = load_tensors(out), load_tensors(base), load_tensors(inst)
    for name in (EMB, HEAD):
        assert o[name].shape == (576, 64)
        aligned_base = torch.cat([b[name], i[name][512:]])
        expected = 0.6 * aligned_base.mean(0) + 0.4 * i[name].mean(0)
        close(o[name][514:], expected.expand(62, 64))
    _, _, logits = head_inputs_and_logits(out, CHAT)
    assert logits.shape[-1] == 576 and torch.isfinite(logits).all()


def test_tied_and_untied_inputs(tok_models, tmp_path):
    """A tied model has no lm_head: its embedding rows stand in for the head, aligned the same way."""
    base, tied = tok_models["base"], tok_models["tied"]
    out = tmp_path / "mixed"
    run_merge(linear([(base, 0.5), (tied, 0.5)], base, tokenizer_source="union"), out, QUIET)
    o, b, t = load_tensors(out), load_tensors(base), load_tensors(tied)
    assert HEAD not in t
    close(o[HEAD][:512], 0.5 * b[HEAD] + 0.5 * t[EMB][:512])
    close(o[HEAD][512:], t[EMB][512:])
    close(o[EMB][512:], t[EMB][512:])

    both = tmp_path / "tied"
    run_merge(
        linear(
            [(tok_models["tied_base"], 0.5), (tied, 0.5)], tok_models["tied_base"], tokenizer_source="union"
        ),
        both,
        QUIET,
    )
    o2, tb = load_tensors(both), load_tensors(tok_models["tied_base"])
    assert HEAD not in o2 and o2[EMB].shape == (514, 64)
    config = json.loads((both / "config.json").read_text())
    assert config["vocab_size"] == 514 and config["tie_word_embeddings"] is True
    close(o2[EMB][:512], 0.5 * tb[EMB] + 0.5 * t[EMB][:512])
    ids, h, logits = head_inputs_and_logits(both, CHAT)
    assert torch.isfinite(logits).all()
    close(logits[:, 512:], h @ t[EMB][512:].T)


def test_without_tokenizer_settings_embeddings_are_truncated_and_the_tokenizer_copied(
    tok_models, tmp_path, caplog
):
    base, inst = tok_models["base"], tok_models["inst"]
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="mergesmith"):
        run_merge(linear([(base, 0.5), (inst, 0.5)], base), out, QUIET)
    assert "vocabularies differ" in caplog.text
    assert load_tensors(out)[EMB].shape == (512, 64)
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 512


def test_dry_run_plans_aligned_shapes_with_index_only_aligners(tok_models, tmp_path):
    base, inst = tok_models["base"], tok_models["inst"]
    plan = plan_merge(linear([(base, 0.5), (inst, 0.5)], base, tokenizer_source="union"))
    emb = next(t for t in plan.tensors if t.name == EMB)
    assert emb.shape == (514, 64) and emb.vocab is not None
    assert all(s.rows is None for s in emb.sources)
    assert all(p.dtype == torch.long and p.dim() == 1 for p in emb.vocab.perms)
    assert plan.out_config["vocab_size"] == 514
    assert plan.tokenizer is not None and plan.tokenizer.replaces_donor_files
    assert all(t.vocab is None for t in plan.tensors if t.name not in (EMB, HEAD))
    result = run_merge(
        linear([(base, 0.5), (inst, 0.5)], base, tokenizer_source="union"),
        tmp_path / "o",
        MergeOptions(dry_run=True, quiet=True),
    )
    assert result.out_path is None and not (tmp_path / "o").exists()


def test_aligner_matches_mergekits_arithmetic_in_bfloat16(tok_models):
    """Inputs are cast to the compute dtype first, means are summed in model order and then divided."""
    base, inst, inst2 = tok_models["base"], tok_models["inst"], tok_models["inst2"]
    cfg = linear(
        [(base, 1), (inst, 1), (inst2, 1)], base, tokenizer={"pad_to_multiple_of": 8}, dtype="bfloat16"
    )
    emb = next(t for t in plan_merge(cfg).tensors if t.name == EMB)
    inputs = [load_tensors(p)[EMB] for p in (base, inst, inst2)]
    aligned = emb.vocab.align(inputs)
    assert [a.dtype for a in aligned] == [torch.bfloat16] * 3 and all(a.shape == (520, 64) for a in aligned)
    b, i, j = (t.to(torch.bfloat16) for t in inputs)
    mean = (torch.zeros(2, 64, dtype=torch.bfloat16) + i[512:]) + j[512:]
    mean /= 2
    assert torch.equal(aligned[0][:512], b) and torch.equal(aligned[0][512:514], mean)
    assert torch.equal(aligned[1][:514], i) and torch.equal(aligned[2][:514], j)
    for a in aligned:
        assert torch.equal(a[514:], torch.mean(a[:514], dim=0).expand(6, 64))


def test_token_sources_that_cannot_be_served_fail_while_planning(tok_models, tmp_path, caplog):
    base, inst, other = tok_models["base"], tok_models["inst"], tok_models["inst2"]
    cases = [
        ({"<|im_start|>": {"source": str(other)}}, "is not one of the merged models"),
        (
            {"<|im_start|>": {"source": {"kind": "model_token", "model": str(inst), "token": "<nope>"}}},
            "has no token",
        ),
        (
            {"<|im_start|>": {"source": {"kind": "model_token", "model": str(inst), "token_id": 9999}}},
            "out of range",
        ),
        ({"<|im_start|>": {"source": str(base)}}, "does not have token"),
    ]
    for tokens, message in cases:
        cfg = linear([(base, 0.5), (inst, 0.5)], base, tokenizer={"tokens": tokens})
        with pytest.raises(PlanError, match=message):
            run_merge(cfg, tmp_path / "out", QUIET)
        assert not (tmp_path / "out").exists()
    assert "is not one of the merged models" in caplog.text  # warned when the config was read


def test_tokens_everyone_has_need_no_source(tok_models, tmp_path):
    """An override for a token every input has, without force, is never used (as in mergekit)."""
    base, inst = tok_models["base"], tok_models["inst"]
    cfg = linear(
        [(base, 0.5), (inst, 0.5)], base, tokenizer={"tokens": {"<s>": {"source": str(tok_models["inst2"])}}}
    )
    plan = plan_merge(cfg)
    assert next(t for t in plan.tensors if t.name == EMB).shape == (514, 64)


def test_base_tokenizer_is_cut_to_the_models_vocab_size(tok_models, tmp_path):
    """The base model's tokenizer has more tokens than its embedding has rows: those tokens (and the merge
    rules that build them) are removed, and the result still loads and round-trips text."""
    from mergesmith.testing.tiny_models import make_tokenizer

    base = tmp_path / "base"
    shutil.copytree(tok_models["base"], base)
    for f in base.glob("tokenizer*"):
        f.unlink()
    make_tokenizer(base, 600, ("<|tool|>",))
    out = tmp_path / "out"
    run_merge(linear([(base, 0.5), (tok_models["inst"], 0.5)], base, tokenizer_source="union"), out, QUIET)
    tok = tokenizer(out)
    vocab = tok.get_vocab()
    assert len(vocab) == 514 and "<|tool|>" not in vocab
    assert vocab["<|im_start|>"] == IM_START and vocab["<|im_end|>"] == IM_END
    assert tok.decode(tok(TEXT)["input_ids"], skip_special_tokens=True) == TEXT
    assert load_tensors(out)[EMB].shape == (514, 64)


def test_only_tensors_with_one_row_per_token_are_reindexed():
    """A tensor is aligned unless no source's row count equals its model's vocab_size (when known)."""
    from mergesmith.tokenizer import Vocabulary

    v = Vocabulary(tokenizer=None, size=514, rows=514, perms=[], names=["a", "b"], config_sizes=[512, None])
    assert v.indexes([0, 1], [512, 700]) and v.indexes([1], [700])
    assert not v.indexes([0, 1], [300, 300])


def test_identical_vocabularies_need_no_reindexing(tok_models):
    inst, inst2 = tok_models["inst"], tok_models["inst2"]
    plan = plan_merge(linear([(inst, 0.5), (inst2, 0.5)], inst, tokenizer_source="union"))
    aligners = [t.vocab for t in plan.tensors if t.vocab is not None]
    assert len(aligners) == 2 and all(a.trivial for a in aligners)
    forced = plan_merge(
        linear(
            [(inst, 0.5), (inst2, 0.5)],
            inst,
            tokenizer={"tokens": {"<s>": {"source": str(inst2), "force": True}}},
        )
    )
    emb = next(t for t in forced.tensors if t.name == EMB).vocab
    assert not emb.trivial and emb.digest() != aligners[0].digest()
