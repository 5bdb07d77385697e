"""Fill in a masked line of a held-out file with a trained model, using transformers alone.

    python scripts/infill.py outputs/quickstart/model --recipe recipes/tiny/pretrain.yaml

The file comes from the recipe's held-out repositories (eval_fraction); `--file PATH` infills any
file instead. Inference needs nothing of this project: AutoTokenizer, AutoModelForCausalLM and the PSM
prompt `<fim_prefix>before<fim_suffix>after<fim_middle>` (or SPM, `--mode spm`, the recipe's fim_eval_mode by
default with `--recipe`), with the code tokenized with special-token
parsing off (split_special_tokens=True) so that text in the file can never act as a control token.
"""

import random
import sys

from starcoder2_train.cli import ScriptParser, run_script


def held_out_file(recipe_argv: list[str]) -> tuple[dict, str]:
    """The first file of the first held-out repository of the recipe, and the recipe's fim_eval_mode (this part
    uses the project's reader)."""
    from starcoder2_train.data.filters.splits import repository_split
    from starcoder2_train.data.sources.shards import load_repositories
    from starcoder2_train.recipe import RecipeParser

    _, data_args, training_args = RecipeParser().parse(recipe_argv)
    repositories, _ = load_repositories(data_args)
    _, held_out = repository_split(repositories, max(data_args.eval_fraction, 0.01))
    if len(held_out) == 0:
        sys.exit("no held-out repository: raise --eval_fraction or pass --file PATH")
    files = [{"repo_name": repo["repo_name"], **f} for repo in held_out for f in repo["files"]]
    # A file of ordinary length shows infilling best; fall back to any held-out file.
    return next((f for f in files if 30 <= f["content"].count("\n") <= 400), files[0]), training_args.fim_eval_mode


def infill(model, tokenizer, before: str, after: str, max_new_tokens: int = 48, mode: str = "psm") -> str:
    """Greedy PSM (or, with mode "spm", SPM: <fim_prefix><fim_suffix>after<fim_middle>before) infilling; stops at
    <|endoftext|> or <file_sep>. As in the FIM evaluation, `before` goes into the
    prompt without the newline it ends with, and the first token generated is one that starts with that newline
    (token healing: a newline and the next line's indentation are one token of this tokenizer, see
    src/starcoder2_train/evaluation/fim.py); transformers' prefix_allowed_tokens_fn applies it."""
    import torch

    healed = before.endswith("\n")
    before = before[:-1] if healed else before
    ids = lambda text: tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids  # noqa: E731
    token = tokenizer.convert_tokens_to_ids
    if mode == "spm":
        prompt = [token("<fim_prefix>"), token("<fim_suffix>"), *ids(after), token("<fim_middle>"), *ids(before)]
    else:
        prompt = [token("<fim_prefix>"), *ids(before), token("<fim_suffix>"), *ids(after), token("<fim_middle>")]
    every = list(range(len(tokenizer)))
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    pieces = tokenizer.batch_decode([[i] for i in every])
    newline_first = [i for i in every if pieces[i].startswith("\n") and i not in special]
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=[token("<|endoftext|>"), token("<file_sep>")],
            pad_token_id=token("<|endoftext|>"),
            prefix_allowed_tokens_fn=lambda row, sent: newline_first if healed and len(sent) == len(prompt) else every,
        )
    return tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True)


def parse_args(argv=None):
    """(the options, the recipe's `--key value` overrides: with --recipe only, their grammar checked)."""
    parser = ScriptParser(description=__doc__)
    parser.add_argument("model", help="A saved model directory (or Hub id).")
    parser.add_argument("--file", help="Infill this file instead of a held-out one.")
    parser.add_argument("--recipe", help="Recipe whose held-out repositories to draw the file from.")
    parser.add_argument("--seed", type=int, default=0, help="Chooses the masked line.")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument(
        "--mode", choices=("psm", "spm"), help="Prompt order (default: the recipe's fim_eval_mode, else psm)."
    )
    args, recipe_overrides = parser.parse_with_overrides(argv)
    if recipe_overrides and not args.recipe:
        parser.error(f"unrecognized arguments: {' '.join(recipe_overrides)} (recipe keys need --recipe)")
    if not args.file and not args.recipe:
        parser.error("give --file PATH or --recipe RECIPE.yaml")
    return args, recipe_overrides


def main(argv=None):
    args, recipe_overrides = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # after the parse: a mistyped word is quick

    if args.file:
        with open(args.file, encoding="utf-8") as handle:
            source = {"path": args.file, "content": handle.read()}
        mode = args.mode or "psm"
    else:
        source, recipe_mode = held_out_file([args.recipe, *recipe_overrides])
        mode = args.mode or recipe_mode

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    lines = source["content"].splitlines(keepends=True)
    candidates = [i for i, line in enumerate(lines) if line.strip() and 0 < i < len(lines) - 1] or [0]
    masked = random.Random(args.seed).choice(candidates)
    # The hole is the line's text; its line break starts `after`, as in the FIM evaluation.
    body = lines[masked].rstrip("\r\n")
    before = "".join(lines[max(0, masked - 30) : masked])
    after = lines[masked][len(body) :] + "".join(lines[masked + 1 : masked + 15])
    middle = infill(model, tokenizer, before, after, args.max_new_tokens, mode)
    print(f"file: {source.get('repo_name', '')} {source['path']}, line {masked + 1} masked ({mode.upper()} prompt)")
    print("----- before (last lines)\n" + "".join(lines[max(0, masked - 4) : masked]), end="")
    print(f"----- expected: {lines[masked].rstrip()!r}")
    from starcoder2_train.evaluation.fim import infilled_line, is_exact_match  # the FIM evaluation's rules

    generated = infilled_line(middle, before)
    if generated is None:
        extension = middle.split("\n", 1)[0]
        print(
            f"----- generated: {extension!r} without a newline first: it extends the line before (not an exact match)"
        )
    else:
        verdict = "exact match" if is_exact_match(generated, lines[masked]) else "not an exact match"
        print(f"----- generated: {generated.rstrip()!r} ({verdict})")
    print("----- after (first lines)\n" + "".join(lines[masked + 1 : masked + 4]), end="")
    return middle


if __name__ == "__main__":
    run_script(main)  # a bad recipe, input or path: one `error:` line, no traceback (starcoder2_train.cli)
