"""Build tiny random Hugging Face causal-LM checkpoints on disk, for tests and the demo.

Every helper writes an ordinary model directory (config.json, safetensors weights, generation_config.json,
tokenizer files) that ``transformers.AutoModelForCausalLM.from_pretrained`` loads. Models are small enough
(hidden 64, 4 layers, vocab 512) that building one takes a few tens of milliseconds after the first import.

Special-token ids are fixed for every tokenizer and model built here: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2,
``<pad>`` 3. A tokenizer built with ``vocab_size=N`` and ``extra_tokens=(a, b)`` has exactly ``N + 2`` tokens:
ids ``0..N-1`` are the same for every call with that ``N`` (training is deterministic), and the extra tokens
get ids ``N`` and ``N + 1`` in the order given. ``make_model`` sizes the embedding to match.

transformers, tokenizers and torch are imported lazily, inside the functions.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import shutil
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox")

DEFAULT_VOCAB_SIZE = 512
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS: tuple[str, ...] = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MAX_POSITIONS = 128
NUM_HEADS = 4
NUM_KV_HEADS = 2

# ByteLevel BPE always holds the 256 byte symbols plus the special tokens.
_MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS: tuple[str, ...] = (
    "Model merging combines the weights of two or more fine-tuned language models into a single model "
    "without any further training. The simplest method takes a weighted average of every parameter. "
    "More careful methods look at the difference between each fine-tuned model and a shared base model, "
    "trim the small changes, resolve the signs that disagree, and add what remains back onto the base.",
    "Spherical linear interpolation walks along the arc between two weight vectors instead of the straight "
    "line, so the norm of the result stays close to the norms of the inputs. When the two vectors point in "
    "nearly the same direction, the arc and the line are almost the same, and plain interpolation is used.",
    "The old lighthouse keeper climbed the stairs every evening at dusk. He trimmed the wick, polished the "
    "great lens, and watched the ships sail past the rocks. On stormy nights the wind howled around the "
    "tower, the rain beat against the glass, and the beam swept across the dark and restless water.",
    "To bake a simple loaf of bread, mix flour, water, salt and a little yeast in a large bowl. Knead the "
    "dough for ten minutes until it is smooth and elastic, then leave it to rise in a warm place for an "
    "hour. Shape the loaf, let it rise again, and bake it in a hot oven until the crust is golden brown.",
    "A tokenizer splits text into small pieces called tokens. Byte pair encoding starts from single bytes "
    "and repeatedly joins the most frequent pair of neighbouring symbols into a new symbol, until the "
    "vocabulary reaches the size that was asked for. Common words become single tokens; rare words are "
    "spelled out from smaller parts.",
    "In the spring the river rose and flooded the low meadows. The children waded through the shallow "
    "water, chasing frogs and collecting smooth stones. Their mother called them home for supper, and they "
    "ran back across the fields with wet shoes, muddy knees and pockets full of treasure.",
    "Numbers and symbols matter too: 1, 2, 3, 10, 42, 100, 2024; x + y = z; a * b - c / d; (a, b) [c] {d}. "
    "Questions? Answers! Quotes \"like this\" and 'like that'; "
    "tabs\tand new lines\nare all bytes in the end.",
    "Every morning the market square filled with traders selling apples, cheese, fresh fish and warm "
    "bread. The baker shouted his prices, the fishmonger sharpened his knives, and the old woman at the "
    "corner sold flowers that she had picked before sunrise. By noon the stalls were empty and quiet.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly "
    "quick daft zebras jump. The five boxing wizards jump quickly. Sphinx of black quartz, judge my vow.",
)


def _check_arch(arch: str) -> str:
    key = str(arch).strip().lower().replace("-", "_")
    if key == "gptneox":
        key = "gpt_neox"
    if key not in ARCHITECTURES:
        raise ValueError(
            f"unknown tiny-model architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}"
        )
    return key


# ---------------------------------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=16)
def _trained_tokenizer_json(vocab_size: int) -> str:
    """Train a ByteLevel BPE tokenizer on CORPUS with exactly ``vocab_size`` tokens; returns its JSON."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {_MIN_VOCAB_SIZE} (256 bytes + 4 special tokens)")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(CORPUS), trainer=trainer)
    # A small corpus may run out of merges before vocab_size: fill the rest with reserved special tokens.
    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if missing > 0:
        tok.add_special_tokens(
            [AddedToken(f"<|reserved_{i}|>", special=True, normalized=False) for i in range(missing)]
        )
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError(f"tokenizer training produced {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    ids = tok.get_vocab()
    if [ids[t] for t in SPECIAL_TOKENS] != [UNK_ID, BOS_ID, EOS_ID, PAD_ID]:
        raise RuntimeError("special tokens did not get the expected ids")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    return tok.to_str()


def build_tokenizer(
    vocab_size: int = DEFAULT_VOCAB_SIZE, extra_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Return an in-memory tokenizer of exactly ``vocab_size + len(extra_tokens)`` tokens (see module doc)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(_trained_tokenizer_json(int(vocab_size)))
    extra = list(extra_tokens)
    if len(set(extra)) != len(extra):
        raise ValueError(f"extra_tokens has duplicates: {extra}")
    vocab = raw.get_vocab(with_added_tokens=True)
    clash = [t for t in extra if t in vocab]
    if clash:
        raise ValueError(f"extra_tokens already in the base vocabulary: {clash}")
    if extra:
        raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    if "<|im_start|>" in extra and "<|im_end|>" in extra:
        tokenizer.chat_template = CHATML_TEMPLATE
    want = int(vocab_size) + len(extra)
    if len(tokenizer) != want:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {want}")
    return tokenizer


def make_tokenizer(
    out_dir: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE, extra_tokens: Sequence[str] = ()
) -> Path:
    """Train (cached per vocab_size) a small ByteLevel BPE tokenizer and ``save_pretrained`` it to out_dir.

    The saved tokenizer has exactly ``vocab_size + len(extra_tokens)`` tokens; the extra tokens are added
    tokens (special, not normalized) with ids ``vocab_size, vocab_size + 1, ...``. When both
    ``<|im_start|>`` and ``<|im_end|>`` are among them, a ChatML chat template is set. Returns out_dir.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(vocab_size, extra_tokens).save_pretrained(str(out))
    return out


# ------------------------------------------------------------------------------------------------- models


def make_config(
    arch: str,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    num_layers: int = 4,
    hidden: int = 64,
    tie_word_embeddings: bool | None = None,
) -> PretrainedConfig:
    """A transformers config for ``arch`` with tiny sizes: 4 heads (2 kv heads where supported), head_dim
    hidden/4, intermediate 2*hidden, 128 positions, special-token ids 1/2/3 (bos/eos/pad)."""
    arch = _check_arch(arch)
    if hidden % (2 * NUM_HEADS) != 0:
        raise ValueError(f"hidden must be a multiple of {2 * NUM_HEADS}, got {hidden}")
    head_dim = hidden // NUM_HEADS
    inter = 2 * hidden
    ids: dict[str, Any] = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    if tie_word_embeddings is not None:
        ids["tie_word_embeddings"] = bool(tie_word_embeddings)
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": num_layers,
        "num_attention_heads": NUM_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        **ids,
    }
    gqa = {"num_key_value_heads": NUM_KV_HEADS}

    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common, **gqa, head_dim=head_dim)
    if arch == "mistral":
        from transformers import MistralConfig

        return MistralConfig(**common, **gqa, head_dim=head_dim, sliding_window=None)
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common, **gqa)
    if arch == "gemma":
        from transformers import GemmaConfig

        return GemmaConfig(**common, **gqa, head_dim=head_dim)
    if arch == "phi3":
        from transformers import Phi3Config

        return Phi3Config(**common, **gqa, original_max_position_embeddings=MAX_POSITIONS)
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_inner=inter,
            n_layer=num_layers,
            n_head=NUM_HEADS,
            n_positions=MAX_POSITIONS,
            **ids,
        )
    from transformers import GPTNeoXConfig  # gpt_neox: no GQA

    return GPTNeoXConfig(**common)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' per-save progress bars (restoring the previous setting afterwards)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _save_kwargs(model: Any, shard_size: str | int | None) -> dict[str, Any]:
    params = inspect.signature(model.save_pretrained).parameters
    kwargs: dict[str, Any] = {}
    if "safe_serialization" in params:  # transformers 4.x; 5.x always writes safetensors
        kwargs["safe_serialization"] = True
    if shard_size is not None:
        kwargs["max_shard_size"] = shard_size
    return kwargs


def make_model(
    arch: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_layers: int = 4,
    hidden: int = 64,
    tie_word_embeddings: bool | None = None,
    dtype: str = "float32",
    vocab_size: int | None = None,
    with_tokenizer: bool = True,
    shard_size: str | int | None = None,
    extra_tokens: Sequence[str] = (),
) -> Path:
    """Build a tiny randomly initialised causal LM of ``arch`` and save it (safetensors) to out_dir.

    ``vocab_size`` (default 512) is the base vocabulary; the model's embedding has
    ``vocab_size + len(extra_tokens)`` rows, matching the tokenizer written alongside when
    ``with_tokenizer``. ``tie_word_embeddings=None`` keeps the config class default. ``shard_size``
    (e.g. ``"200KB"``) is passed as ``max_shard_size`` to produce a sharded checkpoint with an index.
    Weights use transformers' own init (normal, std 0.02) under ``torch.manual_seed(seed)``.
    Returns out_dir as a Path.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from mergesmith._util import torch_dtype

    base_vocab = DEFAULT_VOCAB_SIZE if vocab_size is None else int(vocab_size)
    config = make_config(
        arch,
        vocab_size=base_vocab + len(tuple(extra_tokens)),
        num_layers=num_layers,
        hidden=hidden,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model = model.to(torch_dtype(dtype)).eval()
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _quiet_progress():
        model.save_pretrained(str(out), **_save_kwargs(model, shard_size))
    if with_tokenizer:
        make_tokenizer(out, base_vocab, extra_tokens)
    return out


# ------------------------------------------------------------------------------------- derived checkpoints


def _noise_seed(seed: int, name: str) -> int:
    # Depends only on (seed, tensor name), so sharded and unsharded copies of a model get the same noise.
    return (int(seed) * 0x9E3779B1 + zlib.crc32(name.encode("utf-8"))) % (2**63)


def _safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def _copy_other_files(src: Path, dst: Path, skip: set[str]) -> None:
    for item in sorted(src.iterdir()):
        if item.name in skip or item.suffix == ".safetensors":
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dst / item.name)


def make_finetune(base_dir: str | Path, out_dir: str | Path, *, seed: int, noise: float = 0.01) -> Path:
    """Copy a model directory, adding gaussian noise (std ``noise``) to every floating-point tensor.

    Works on safetensors files directly (single file or sharded with an index); every other file is
    copied unchanged and dtypes are kept. Returns out_dir as a Path.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base, out = Path(base_dir), Path(out_dir)
    if out.resolve() == base.resolve():
        raise ValueError("make_finetune: out_dir must differ from base_dir")
    files = _safetensors_files(base)
    out.mkdir(parents=True, exist_ok=True)
    _copy_other_files(base, out, skip=set())
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
        tensors = load_file(str(path))
        noisy = {}
        for name in sorted(tensors):
            tensor = tensors[name]
            if tensor.is_floating_point():
                gen = torch.Generator().manual_seed(_noise_seed(seed, name))
                delta = torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * noise
                tensor = (tensor.to(torch.float32) + delta).to(tensor.dtype)
            noisy[name] = tensor.contiguous()
        save_file(noisy, str(out / path.name), metadata=metadata)
    return out


def save_as_pytorch_bin(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the model in model_dir as a single ``pytorch_model.bin`` (torch.save of the state dict), plus
    its config, generation config and tokenizer files (the safetensors index is left out). Returns out_dir.
    """
    import torch
    from safetensors.torch import load_file

    src, out = Path(model_dir), Path(out_dir)
    if out.resolve() == src.resolve():
        raise ValueError("save_as_pytorch_bin: out_dir must differ from model_dir")
    state: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(src):
        state.update(load_file(str(path)))
    out.mkdir(parents=True, exist_ok=True)
    _copy_other_files(src, out, skip={"model.safetensors.index.json"})
    torch.save(state, out / "pytorch_model.bin")
    return out
