"""Train a byte-level BPE tokenizer with StarCoder2's special tokens, and load one safely.

The tokenizer is built like StarCoder2's: every digit is its own pre-token, then GPT-2's byte-level
pre-tokenizer (its regex split, no prefix space) maps bytes to printable characters, BPE merges are
learned on top, and a byte-level decoder turns ids back into the exact text. The 34 special tokens of
`STARCODER2_SPECIAL_TOKENS` come first, with ids 0, 1, 2, ... in that order.

Special-token text in the training data. BPE training does not split added tokens out of the text,
so a source file containing the literal text `<fim_middle>` is learned from like any other text. If
merges could rebuild that string, the learned token would share the special token's vocabulary entry
and encoding source text with special-token parsing *off* would still emit the control id. The
byte-level regex prevents this: it cuts `<`/`|` runs from letters, so `<fim_middle>` reaches BPE as
`<`, `fim`, `_`, `middle`, `>` and no merge can span it. (Without the regex, tokenizers 0.23 does
learn `<fim_middle>` from such text.) `learned_special_tokens` checks the trained merges and
`train_tokenizer` refuses to save a tokenizer where the check fails.

Saved tokenizer: `tokenizer.json` + `tokenizer_config.json`, loaded by `AutoTokenizer.from_pretrained`
as transformers' fast (tokenizers-backed) class. eos = bos = unk = `<|endoftext|>`, as released;
no pad token, as released: packed training never pads, and code that needs one must choose it.
model_max_length is 16384 by default, the released models' context (the real tokenizer leaves it unset).
"""

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from starcoder2_train.configs import RecipeError, hub_hint
from starcoder2_train.data.sources.shards import parquet_layout
from starcoder2_train.data.special_tokens import EOS_TOKEN, STARCODER2_SPECIAL_TOKENS, SpecialTokenIds
from starcoder2_train.progress import progress

DEFAULT_MODEL_MAX_LENGTH = 16384  # the longest context of the released StarCoder2 models
BATCH_ROWS = 64  # parquet rows read at a time: per-repository rows can hold thousands of files


def iter_parquet_contents(data_dir: str | os.PathLike, max_files: int | None = None) -> Iterator[str]:
    """Yield the `content` of every source file in the parquet shards under `data_dir`, in sorted path order.

    Reads both Stack v2 layouts: per-repository rows (`files`: a list of structs with `content`) and
    per-file rows (a `content` column). Null contents are skipped; at most `max_files` are yielded.
    """
    shards = sorted(Path(data_dir).rglob("*.parquet"))
    if not shards:
        raise RecipeError(f"--data {data_dir}: no .parquet files under it; write shards with scripts/ingest.py.")
    yielded = 0
    for shard in shards:
        parquet = pq.ParquetFile(shard)
        try:
            layout = parquet_layout(str(shard), parquet.schema_arrow, required=("content",))
        except RecipeError as error:
            raise RecipeError(f"--data: {error}") from error
        column = "files" if layout == "repository" else "content"
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=[column]):
            values = batch.column(0)
            if column == "files":
                values = pc.list_flatten(values).field("content")
            for content in values.to_pylist():
                if content is None:
                    continue
                yield content
                yielded += 1
                if max_files is not None and yielded >= max_files:
                    return


def new_bpe_tokenizer() -> Tokenizer:
    """An untrained tokenizer with StarCoder2's pipeline: single digits, byte-level BPE, byte-level decoding."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            # use_regex must stay on: it is what keeps special-token text from being learned (module docstring).
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def learned_special_tokens(tokenizer: Tokenizer) -> list[str]:
    """The special tokens that a learned BPE merge produces (should be none).

    A merge whose result is a special token's text makes plain source text encode to that special id.
    """
    specials = set(STARCODER2_SPECIAL_TOKENS)
    found = []
    # The merges are only reachable through the serialized model: pairs, or "left right" strings in old files.
    for merge in json.loads(tokenizer.to_str())["model"]["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        if left + right in specials:
            found.append(left + right)
    return found


def train_tokenizer(
    texts: Iterator[str],
    vocab_size: int,
    output_dir: str | os.PathLike | None = None,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    min_frequency: int = 2,
):
    """Train byte-level BPE on `texts` and return the transformers tokenizer (saved to `output_dir` if given).

    `vocab_size` counts everything: 34 special tokens, 256 byte symbols and the learned merges.
    """
    from transformers import PreTrainedTokenizerFast

    floor = len(STARCODER2_SPECIAL_TOKENS) + 256
    if vocab_size <= floor:
        raise RecipeError(f"--vocab_size: must exceed {floor} (34 special tokens + 256 bytes), got {vocab_size}.")
    tokenizer = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=STARCODER2_SPECIAL_TOKENS,  # added first, so their ids are 0, 1, 2, ...
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    leaked = learned_special_tokens(tokenizer)
    if leaked:
        raise RuntimeError(
            f"BPE learned the special token(s) {', '.join(leaked)} from the data; the pre-tokenizer "
            "must split special-token text (ByteLevel use_regex=True)."
        )
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        extra_special_tokens=STARCODER2_SPECIAL_TOKENS[1:],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # code: " ," must decode as " ,"
    )
    wrong = [t for i, t in enumerate(STARCODER2_SPECIAL_TOKENS) if hf_tokenizer.convert_tokens_to_ids(t) != i]
    if wrong:
        raise RuntimeError(f"special token(s) {', '.join(wrong)} did not get their StarCoder2 ids 0..33.")
    if output_dir is not None:
        hf_tokenizer.save_pretrained(output_dir)
    return hf_tokenizer


def train_tokenizer_from_parquet(
    data_dir: str | os.PathLike,
    vocab_size: int,
    output_dir: str | os.PathLike,
    max_files: int | None = None,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> dict:
    """Train on the source files of the shards under `data_dir`, save to `output_dir`; return counts and seconds."""
    counts = {"files": 0, "bytes": 0}

    def counted():
        for text in progress(iter_parquet_contents(data_dir, max_files), desc="tokenizer: files read", unit="file"):
            counts["files"] += 1
            counts["bytes"] += len(text.encode("utf-8", errors="replace"))
            yield text

    start = time.perf_counter()
    tokenizer = train_tokenizer(counted(), vocab_size, model_max_length=model_max_length)
    counts["seconds"] = round(time.perf_counter() - start, 2)
    if counts["files"] == 0:
        raise RecipeError(f"--data {data_dir}: the shards hold no file contents to train on.")
    tokenizer.save_pretrained(output_dir)
    counts["vocab_size"] = len(tokenizer)
    return counts


def load_tokenizer(name_or_path: str | None, revision: str = "main", trust_remote_code: bool = False):
    """AutoTokenizer.from_pretrained, then check that StarCoder2's structure tokens are there.

    Raises RecipeError naming `tokenizer_name_or_path` when loading fails or a token is missing.
    """
    from transformers import AutoTokenizer

    if not name_or_path:
        raise RecipeError(
            "tokenizer_name_or_path: not set, and no model_name_or_path to take it from. Pretraining from "
            "model_config needs a tokenizer: train one with scripts/train_tokenizer.py and set its directory."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise RecipeError(
            f"tokenizer_name_or_path: could not load a tokenizer from {name_or_path!r} ({error}); "
            f"{hub_hint(name_or_path)}. Give a directory written by scripts/train_tokenizer.py or a Hub id such as "
            "bigcode/starcoder2-3b."
        ) from error
    try:
        SpecialTokenIds.from_tokenizer(tokenizer, name=repr(name_or_path))
    except ValueError as error:
        raise RecipeError(str(error)) from error
    return tokenizer
