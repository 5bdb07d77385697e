"""Train a byte-level BPE tokenizer with StarCoder2's special tokens on Stack v2-format parquet shards.

    python scripts/train_tokenizer.py --data data/shards --vocab_size 8192 --output outputs/tokenizer

The special tokens get ids 0..33 in StarCoder2's order; the output directory loads with
`AutoTokenizer.from_pretrained`. Training reads the `content` of every file (per-repository `files`
lists or per-file rows) in sorted shard order; `--max_files` stops after that many files.
"""

import json
import logging
import os

from starcoder2_train.cli import ScriptParser, run_script
from starcoder2_train.progress import FORCE_ENV

logger = logging.getLogger("train_tokenizer")


def parse_args(argv=None):
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="Directory of parquet shards (searched recursively).")
    parser.add_argument(
        "--vocab_size",
        type=int,
        required=True,
        help="Tokens in all: 34 special, 256 bytes, the rest learned merges (StarCoder2: 49152).",
    )
    parser.add_argument("--output", required=True, help="Directory to write tokenizer.json and tokenizer_config.json.")
    parser.add_flag("--disable_tqdm", help="No progress bars (none off a terminal).")
    parser.add_argument("--max_files", type=int, default=None, help="Train on at most this many source files.")
    parser.add_argument(
        "--model_max_length",
        type=int,
        default=None,
        help="Longest sequence the tokenizer reports (tokenizer.model_max_length), in tokens (default: "
        "data/tokens/tokenizer.py's DEFAULT_MODEL_MAX_LENGTH, the released StarCoder2 models' longest context).",
    )
    args = parser.parse_args(argv)
    if args.max_files is not None and args.max_files < 1:
        parser.error(f"--max_files: must be at least 1, got {args.max_files}.")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # Imported after the parse: a mistyped word is refused before transformers loads.
    from starcoder2_train.data.tokens.tokenizer import DEFAULT_MODEL_MAX_LENGTH, train_tokenizer_from_parquet

    if args.disable_tqdm:
        os.environ[FORCE_ENV] = "0"  # starcoder2_train.progress: every bar of this command off
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    counts = train_tokenizer_from_parquet(
        args.data, args.vocab_size, args.output, args.max_files, args.model_max_length or DEFAULT_MODEL_MAX_LENGTH
    )
    logger.info(
        "trained on %d files (%.1f MB) in %.1f s; %d tokens saved to %s",
        counts["files"],
        counts["bytes"] / 1e6,
        counts["seconds"],
        counts["vocab_size"],
        args.output,
    )
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    run_script(main)  # a bad input or path: one `error:` line, no traceback (starcoder2_train.cli)
