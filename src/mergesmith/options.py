"""MergeOptions: every knob of a merge run. The CLI generates its shared flags from these fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mergesmith._util import parse_size


class MergeOptions(BaseModel):
    """Options of a merge run (flag names follow mergekit's where they exist)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    allow_crimes: bool = Field(
        False, description="Allow inputs whose tensor names differ (merge what matches)."
    )
    cuda: bool = Field(False, description="Compute on the GPU (same as --device cuda).")
    device: str | None = Field(None, description="Device to compute on: cpu, cuda, cuda:1, mps, auto.")
    out_shard_size: int = Field(
        parse_size("5B"), description="Maximum bytes per output shard, e.g. 5B, 500M."
    )
    copy_tokenizer: bool = Field(True, description="Copy the base model's tokenizer files to the output.")
    write_model_card: bool = Field(True, description="Write a README.md model card describing the merge.")
    random_seed: int | None = Field(
        None, description="Seed for random methods (dare, della): same seed, same output."
    )
    lazy_unpickle: bool = Field(
        False, description="Accepted for mergekit compatibility; pickles are always read lazily via mmap."
    )
    trust_remote_code: bool = Field(
        False,
        description="Accepted for mergekit compatibility: mergesmith never runs model code from the hub.",
    )
    transformers_cache: str | None = Field(None, description="Hugging Face cache directory for hub models.")
    lora_merge_cache: str | None = Field(
        None,
        description="Directory to keep base+adapter merges in (written while planning) and reuse on later runs.",
    )
    overwrite: bool = Field(False, description="Replace a non-empty output directory.")
    dry_run: bool = Field(False, description="Print the plan and exit without reading any tensor data.")
    read_ahead: int = Field(2, ge=1, description="How many tensors to load ahead of the one being merged.")
    num_threads: int | None = Field(None, ge=1, description="Threads torch may use for compute.")
    max_memory: int | None = Field(
        None,
        description="Memory budget for tensor data, e.g. 8GB: large elementwise merges are done in row "
        "chunks, and a merge that cannot fit is refused before it starts.",
    )
    resume: bool = Field(
        False,
        description="Continue an interrupted merge into the same output from its last completed shard "
        "(completed shards are verified by checksum); keep partial work if interrupted again.",
    )
    quiet: bool = Field(False, description="No progress bar.")
    verbosity: int = Field(0, ge=0, description="More logging (-v, -vv).")

    @field_validator("out_shard_size", "max_memory", mode="before")
    @classmethod
    def _size(cls, v: object) -> int | None:
        if v is None:
            return None
        n = parse_size(v) if isinstance(v, (str, int)) else v
        if not isinstance(n, int) or n <= 0:
            raise ValueError(f"size must be positive, got {v!r}")
        return n

    def resolved_device(self) -> str:
        """The torch device string this run computes on."""
        dev = self.device or ("cuda" if self.cuda else "cpu")
        if dev == "auto":
            import torch

            dev = "cuda" if torch.cuda.is_available() else "cpu"
        return dev
