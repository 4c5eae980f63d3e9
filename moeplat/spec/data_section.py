"""The `data` section: sources (built-in corpora, files, Hugging Face datasets, mixtures, prepared
shards), the tokenizer, and how much validation text is scored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, PositiveInt, PrivateAttr, model_validator

from moeplat.spec.base import Seed, Strict, check


class PythonStdlibSource(Strict):
    """Built-in real corpus: the .py sources of the running Python's standard library (no download)."""

    kind: Literal["python_stdlib"]
    include_tests: bool = False
    max_bytes: PositiveInt | None = Field(
        None, description="Cap on corpus size; documents chosen by a stable hash."
    )


class TextFilesSource(Strict):
    """Local text files and folders (folders walked recursively, filtered by glob patterns).

    Relative paths are resolved against the directory of the spec file that names them.
    """

    kind: Literal["text_files"]
    paths: Annotated[list[str], Field(min_length=1)]
    patterns: Annotated[list[str], Field(min_length=1, default_factory=lambda: ["*.txt", "*.md"])]
    max_bytes: PositiveInt | None = None


class PythonDocsSource(Strict):
    """Built-in English prose: the reStructuredText sources of the Python documentation that Debian's
    python3.11-doc package installs (scripts/system-deps.sh installs it; no download at run time)."""

    kind: Literal["python_docs"]
    max_bytes: PositiveInt | None = Field(
        None, description="Cap on corpus size; documents chosen by a stable hash."
    )


class HfDatasetSource(Strict):
    """What `datasets.load_dataset` reads: a builder (json, parquet, csv, text) over `data_files`
    (local paths, globs, or fsspec URLs such as s3://), or a Hub dataset name (read through the local
    Hugging Face cache when offline). Relative data_files resolve against the spec file's directory.
    Each row is one document, named `<file>:<row>` so the train/validation split is stable."""

    kind: Literal["hf_dataset"]
    path: str = Field(description="Builder (json, parquet, csv, text) or Hub dataset name.")
    name: str | None = Field(None, description="Dataset configuration (load_dataset's `name`).")
    data_files: list[str] | None = Field(None, description="Files, globs or fsspec URLs for a builder.")
    split: str = "train"
    text_field: str = "text"
    text_fields: list[str] | None = Field(
        None, description="Several columns joined by `separator` into one document (replaces text_field)."
    )
    separator: str = "\n\n"
    streaming: bool = Field(False, description="Iterate rows without materialising the dataset.")
    storage_options: dict[str, Any] | None = Field(
        None, description="fsspec options for remote data_files (e.g. endpoint_url for S3)."
    )
    max_bytes: PositiveInt | None = Field(None, description="Stop reading rows past this many bytes.")


# Components of a mixture: any source but a mixture.
LeafSource = Annotated[
    PythonStdlibSource | TextFilesSource | PythonDocsSource | HfDatasetSource, Field(discriminator="kind")
]


class MixtureComponent(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = Field(
        description="Names the source's metrics: val/<name>/loss, val/<name>/bpb."
    )
    weight: Annotated[float, Field(gt=0)] = Field(description="Share of every global batch (normalised).")
    max_tokens: PositiveInt | None = Field(
        None, description="Cap on the source's training tokens; it repeats (reshuffled) once exhausted."
    )
    source: LeafSource


class MixtureSource(Strict):
    """Several sources sampled by weight with Megatron's blended-dataset semantics: every global batch
    holds each source's share of whole sequences; each source keeps its own validation split."""

    kind: Literal["mixture"]
    sources: Annotated[list[MixtureComponent], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique(self) -> MixtureSource:
        problems, seen = [], set()
        for i, c in enumerate(self.sources):
            if c.name in seen:
                problems.append(
                    (f"sources.{i}.name", f"source name {c.name!r} is used twice; names must be unique")
                )
            seen.add(c.name)
        return check(problems) or self


class PreparedSource(Strict):
    """Token shards made by `moeplat data prepare` (moeplat.data.shards), read through np.memmap so
    memory does not grow with the corpus. `path`: a local directory (relative to the spec file) or
    an s3:// URL (downloaded once into a local cache keyed by the corpus fingerprint). The spec's
    data.tokenizer must be the one the directory was prepared with. A directory prepared from a
    mixture holds one sub-directory per source: give each a weight (by name) to train on the blend."""

    kind: Literal["prepared"]
    path: Annotated[str, Field(min_length=1)]
    weights: dict[str, Annotated[float, Field(gt=0)]] | None = Field(
        None, description="Per-source weights of a prepared mixture (names as in its manifest)."
    )


DataSource = Annotated[
    PythonStdlibSource
    | TextFilesSource
    | PythonDocsSource
    | HfDatasetSource
    | MixtureSource
    | PreparedSource,
    Field(discriminator="kind"),
]


class ByteTokenizer(Strict):
    """UTF-8 bytes as tokens (vocab 256): no training, every text representable."""

    kind: Literal["byte"]


class BpeTokenizer(Strict):
    """Byte-level BPE (GPT-2's scheme, Hugging Face `tokenizers`) trained on the training split only
    (never the validation documents). Trained once per (training documents, settings) and cached
    under $MOEPLAT_CACHE_DIR (default ~/.cache/moeplat)/tokenizers/; saved with each run."""

    kind: Literal["bpe"]
    vocab_size: Annotated[int, Field(ge=258, le=262_144)] = Field(
        description="Largest vocabulary: 256 byte symbols + special_tokens + merges (fewer when the "
        "corpus runs out of pairs seen min_frequency times)."
    )
    min_frequency: PositiveInt = Field(2, description="A pair is merged only if seen this often.")
    special_tokens: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] = Field(
        default_factory=lambda: ["<|endoftext|>"],
        description="Ids 0.. in this order; the first is the EOS packed between documents.",
    )

    @model_validator(mode="after")
    def _cross(self) -> BpeTokenizer:
        problems = []
        if len(set(self.special_tokens)) < len(self.special_tokens):
            problems.append(("special_tokens", "names a token twice"))
        if self.vocab_size <= 256 + len(self.special_tokens):
            problems.append(
                ("vocab_size", f"must exceed 256 bytes + {len(self.special_tokens)} special tokens")
            )
        return check(problems) or self


class HfTokenizer(Strict):
    """A ready tokenizer: `path` is a tokenizer.json, a transformers tokenizer directory, or a Hub
    name resolved in the local Hugging Face cache only (never downloaded). Relative paths resolve
    against the spec file's directory (moeplat.spec.tokenizer_files)."""

    kind: Literal["hf"]
    path: Annotated[str, Field(min_length=1)]
    eos_token: str | None = Field(
        None,
        description="Token packed between documents; null = tokenizer_config.json's eos_token, else "
        "the first special token among <|endoftext|>, <|end_of_text|>, </s>, <eos>, <|im_end|>, [SEP].",
    )
    _file: str | None = PrivateAttr(None)  # the tokenizer.json found at validation (absolute)

    @property
    def file(self) -> str | None:
        return self._file


Tokenizer = Annotated[ByteTokenizer | BpeTokenizer | HfTokenizer, Field(discriminator="kind")]


class DataSpec(Strict):
    source: DataSource
    tokenizer: Tokenizer = ByteTokenizer(kind="byte")
    seq_len: PositiveInt
    val_fraction: Annotated[float, Field(gt=0, le=0.5)] = 0.05
    split_seed: Seed = Field(0, description="Seed of the document-level train/validation split.")
    num_workers: Annotated[int, Field(ge=0)] = 0
    prepared_dir: str | None = Field(
        None,
        description="Train from token shards in this directory (relative to the spec file, or s3://): "
        "`moeplat run` prepares it (moeplat data prepare), reuses it while sources and tokenizer match, "
        "and prepares it again, saying why, when either changed. null: tokenize in memory at every run.",
    )
    val_tokens: PositiveInt | Literal["all"] = Field(
        32768,
        description="Validation text per source: this many target tokens, rounded down to whole "
        "sequences (the first ones of the split), or all; independent of batch size and devices.",
    )

    @model_validator(mode="after")
    def _val_tokens(self) -> DataSpec:
        if self.val_tokens != "all" and self.val_tokens < self.seq_len:
            return check(
                [
                    (
                        "val_tokens",
                        f"val_tokens ({self.val_tokens}) is less than one sequence (seq_len {self.seq_len}); "
                        "raise it or use all",
                    )
                ]
            )
        return self
