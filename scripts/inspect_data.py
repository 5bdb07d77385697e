"""Write the first packed samples exactly as the trainer receives them, and summarise the data.

    python scripts/inspect_data.py recipes/tiny/pretrain.yaml --num_samples 4 --output samples.jsonl

One JSON object a line: source (the dataset_mixture entry the window came from), input_ids, labels,
position_ids and text (decoded, special tokens shown). Then a summary, per source for a mixture, followed by each
source's weight beside its realised share of the run's windows, its tokens and passes: repositories, files, files
FIM-transformed as PSM and SPM, tokens, packing efficiency, what was skipped, why (opted-out repositories, files
holding benchmark text, near-duplicates among them), and what PII redaction replaced. The files decontamination
removed are listed in `decontamination_report` (default: beside --output, samples.decontamination.jsonl). Any
recipe key can be overridden as `--key value`.
"""

import json
import os

from starcoder2_train.cli import ScriptParser, run_script


def parse_args(argv=None):
    """(this script's options, RECIPE.yaml and its `--key value` overrides), read before the data libraries are
    imported; the overrides' keys and values are RecipeParser's to check."""
    parser = ScriptParser(description=__doc__, usage="%(prog)s RECIPE.yaml [--num_samples N] [--key value ...]")
    parser.add_argument("--num_samples", type=int, default=4, help="How many packed samples to write.")
    parser.add_argument("--output", default="samples.jsonl", help="JSONL file to write the samples to.")
    return parser.parse_with_overrides(argv, recipe_first=True)


def main(argv=None):
    own_args, recipe_argv = parse_args(argv)
    # Imported after the parse: a mistyped word is refused before the data libraries and transformers load.
    from starcoder2_train.data.pipeline import build_training_data
    from starcoder2_train.data.store.manifest import check_prepared_sources
    from starcoder2_train.data.tokens.tokenizer import load_tokenizer
    from starcoder2_train.recipe import RecipeParser

    model_args, data_args, training_args = RecipeParser().parse(recipe_argv)
    if data_args.decontamination_report is None and data_args.prepared_data_dir is None:
        data_args.decontamination_report = f"{os.path.splitext(own_args.output)[0]}.decontamination.jsonl"
    tokenizer = load_tokenizer(data_args.tokenizer_name_or_path)
    check_prepared_sources(data_args, tokenizer)  # a store of other settings than the recipe's: refused
    dataset, report = build_training_data(data_args, tokenizer, training_args)

    count = min(own_args.num_samples, len(dataset))
    one_source = data_args.sources()[0].name
    source_of = getattr(dataset, "source_of", lambda index: one_source)  # a mixture names each window's source
    with open(own_args.output, "w") as handle:
        for index in range(count):
            sample = dataset[index]
            record = {"source": source_of(index)}
            record.update((key, sample[key].tolist()) for key in ("input_ids", "labels", "position_ids"))
            record["text"] = tokenizer.decode(record["input_ids"], skip_special_tokens=False)
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {count} packed samples of {data_args.seq_length} tokens to {own_args.output}")
    print("sources of the samples: " + " ".join(source_of(index) for index in range(count)))
    for line in report.summary_lines():
        print(line)
    if data_args.decontamination_report:
        listed = data_args.decontamination_report
        print(f"decontamination: {len(report.contaminated):,} files removed, listed in {listed}")
    return report


if __name__ == "__main__":
    run_script(main)  # a bad recipe, input or path: one `error:` line, no traceback (starcoder2_train.cli)
