"""Merge a LoRA adapter into its base model and save a plain transformers model (no peft needed to load it).

    python scripts/merge_adapter.py outputs/lora-run --output outputs/lora-run-merged [--base_model PATH] \
        [--dtype bfloat16]

The base is the adapter's `base_model_name_or_path` (adapter_config.json) unless --base_model is given; an
adapter trained with QLoRA merges into the unquantized checkpoint it names. See model/lora.py.
"""

import argparse
import logging
import os
import sys

from starcoder2_train.cli import ScriptParser


def dtype_name(text: str) -> str:
    """--dtype's value, one of configs.TORCH_DTYPES (imported only when --dtype is given: it loads transformers)."""
    from starcoder2_train.configs import TORCH_DTYPES

    if text not in TORCH_DTYPES:
        raise argparse.ArgumentTypeError(f"invalid choice: '{text}' (choose from {', '.join(TORCH_DTYPES)})")
    return text


def parse_args(argv=None):
    parser = ScriptParser(description=__doc__)
    parser.add_argument("adapter_dir", help="A directory with adapter_config.json (a LoRA run's output).")
    parser.add_argument("--output", required=True, help="Directory to write the merged model to.")
    parser.add_argument("--base_model", help="Base checkpoint (path or Hub id); default: the adapter's own.")
    parser.add_argument(
        "--dtype", type=dtype_name, help="dtype to merge and save in (auto, bfloat16, ...); default: the base's."
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Imported after the parse: a mistyped word is refused before transformers and peft load.
    from starcoder2_train.configs import RecipeError
    from starcoder2_train.model.lora import merge_adapter

    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    try:
        output = merge_adapter(args.adapter_dir, args.output, base_model=args.base_model, dtype=args.dtype)
    except RecipeError as error:  # a bad directory or base: its message says what to do; no traceback
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"merged model written to {output}: {', '.join(sorted(os.listdir(output)))}")
    return output


if __name__ == "__main__":
    main()
