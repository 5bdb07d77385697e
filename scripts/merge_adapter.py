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

from starcoder2_train.configs import TORCH_DTYPES, RecipeError
from starcoder2_train.model.lora import merge_adapter


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter_dir", help="A directory with adapter_config.json (a LoRA run's output).")
    parser.add_argument("--output", required=True, help="Directory to write the merged model to.")
    parser.add_argument("--base_model", help="Base checkpoint (path or Hub id); default: the adapter's own.")
    parser.add_argument("--dtype", choices=TORCH_DTYPES, help="dtype to merge and save in; default: the base's.")
    args = parser.parse_args(argv)
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
