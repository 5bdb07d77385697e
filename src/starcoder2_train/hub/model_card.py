"""The model card (README.md) written with every saved model.

`write_model_card(output_dir, recipe, ...)` describes what was trained: the base model or architecture,
the recipe, the data (languages, tokens seen, and what StarCoder2's preprocessing steps did to it: opt-outs,
decontamination, PII redaction, near-deduplication), the FIM settings, the evaluation results and what each of
them measures (also as model-index metadata, which the Hub shows and huggingface_hub's ModelCard parses)
and a FIM usage example. `update_model_card_results` replaces the results after a later
`scripts/evaluate.py` run.
"""

import json
import os

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from starcoder2_train.configs import DataArguments, is_hub_id
from starcoder2_train.evaluation import TASK_DESCRIPTIONS
from starcoder2_train.training.loss_curve import LOSS_CURVE

RESULTS_START, RESULTS_END = "<!-- evaluation results -->", "<!-- end of evaluation results -->"

FIM_KEYS = ("fim_level", "fim_rate", "fim_fragment_rate", "fim_spm_rate", "repo_metadata_rate")


def _setting(recipe: dict, key: str):
    """The recipe's value of a DataArguments key, else its default."""
    if key in recipe:
        return recipe[key]
    field = DataArguments.__dataclass_fields__[key]
    return field.default_factory() if callable(field.default_factory) else field.default


def _on(value) -> bool:
    return str(value).lower() in ("true", "1", "yes")


def data_steps(recipe: dict) -> list[str]:
    """One line per preprocessing step (docs/data_filters.md): what it did, or that it was off."""
    opt_outs = _setting(recipe, "exclude_repositories")
    benchmarks = _setting(recipe, "decontamination_benchmarks") or []
    benchmarks = [benchmarks] if isinstance(benchmarks, str) else list(benchmarks)
    benchmarks = [] if [str(b).lower() for b in benchmarks] in (["none"], ["false"]) else benchmarks
    files = _setting(recipe, "decontamination_files") or []
    files = [files] if isinstance(files, str) else list(files)
    if benchmarks or files:
        sources = ", ".join([*map(str, benchmarks), *(f"`{path}`" for path in files)])
        decontamination = (
            f"files containing a docstring or solution of {sources} (whitespace-insensitive, texts of at least "
            f"{_setting(recipe, 'decontamination_min_chars')} characters) were removed"
        )
    else:
        decontamination = "off: benchmark scores of this model (HumanEval) may be inflated by training on them"
    if _on(_setting(recipe, "pii_redaction")):
        model = _setting(recipe, "pii_model_path")
        pii = "emails, API keys and secrets, passwords and public IP addresses replaced by placeholders"
        pii += f", and the entities of the model `{model}`" if model else " (rules only; names not redacted)"
    else:
        pii = "off"
    if _on(_setting(recipe, "near_dedup")):
        n, b, r = (_setting(recipe, f"near_dedup_{key}") for key in ("ngrams", "buckets", "hashes_per_bucket"))
        near_dedup = (
            f"MinHash over {n}-word shingles, {b} bands of {r} hashes (Jaccard threshold about "
            f"{(1 / int(b)) ** (1 / int(r)):.2f}); one file of each group of near-copies kept"
        )
    else:
        near_dedup = "off"
    return [
        f"- Opt-outs: {f'repositories listed in `{opt_outs}` removed' if opt_outs else 'none given'}",
        f"- Decontamination: {decontamination}",
        f"- PII redaction: {pii}",
        f"- Near-deduplication: {near_dedup}",
    ]


def mixture_entries(recipe: dict) -> list[dict]:
    """The recipe's dataset_mixture entries as mappings (JSON text from the command line read back), each with its
    weight divided by the weights' sum; [] without a mixture."""
    entries = [json.loads(e) if isinstance(e, str) else dict(e) for e in recipe.get("dataset_mixture") or []]
    total = sum(float(entry.get("weight", 0)) for entry in entries) or 1.0
    return [{**entry, "weight": float(entry.get("weight", 0)) / total} for entry in entries]


def mixture_table(entries: list[dict]) -> str:
    """The mixture as a Markdown table: name, dataset (and data_dir), share of the training windows, kind, and
    the keys the entry sets for itself."""
    if not entries:
        return ""
    rows = ["", "Mixture (each source's share of the training windows; a source repeats when it runs out):", ""]
    rows += ["| source | dataset | share of training windows | own settings |", "|---|---|---|---|"]
    for entry in entries:
        dataset = entry.get("dataset_name_or_path") + (f" ({entry['data_dir']})" if entry.get("data_dir") else "")
        own = ", ".join(
            f"{key}: {value}"
            for key, value in entry.items()
            if key not in ("name", "weight", "dataset_name_or_path", "data_dir")
        )
        rows.append(f"| {entry.get('name', '')} | `{dataset}` | {100 * entry['weight']:.2f}% | {own or '-'} |")
    return "\n".join(rows)


def model_index(results: dict[str, dict]) -> list[EvalResult]:
    """Evaluation results nested by task (as scripts/evaluate.py writes them) as model-index entries."""
    entries = []
    for key, value in results.get("humaneval", {}).items():
        if key.startswith("pass@"):
            args = {
                name: results["humaneval"][setting]
                for name, setting in (("n", "samples"), ("temperature", "temperature"))
                if setting in results["humaneval"]
            }
            entries.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Code generation",
                    dataset_type="openai_humaneval",
                    dataset_name="HumanEval",
                    metric_type=key,
                    metric_name=key,
                    metric_value=value,
                    metric_args=args or None,
                )
            )
    # Loss and FIM need distinct dataset names and types: the Hub groups results by (task type, dataset).
    for task, metrics, task_name, dataset_type, dataset_name in (
        (
            "fim",
            ("exact_match",),
            "Single-line infilling (FIM)",
            "held-out-single-line-fim",
            "Held-out single-line infilling",
        ),
        ("loss", ("perplexity", "loss"), "Language modelling", "held-out-files", "Held-out files"),
    ):
        for key, value in results.get(task, {}).items():
            metric, _, language = key.partition("/")
            if metric in metrics:
                entries.append(
                    EvalResult(
                        task_type="text-generation",
                        task_name=task_name,
                        dataset_type=dataset_type,
                        dataset_name=f"{dataset_name} ({language or 'all languages'})",
                        dataset_config=language or None,
                        metric_type=metric,
                        metric_value=value,
                    )
                )
    return entries


def _results_section(results: dict[str, dict]) -> str:
    measured = "\n".join(f"- **{task}**: {TASK_DESCRIPTIONS[task]}." for task in results if task in TASK_DESCRIPTIONS)
    rows = [
        f"| {task} | {key} | {value:.4g} |" if isinstance(value, float) else f"| {task} | {key} | {value} |"
        for task, metrics in results.items()
        for key, value in metrics.items()
    ]
    table = (
        "\n".join(["| task | metric | value |", "|---|---|---|", *rows])
        if rows
        else "Not evaluated yet: run `python scripts/evaluate.py MODEL_DIR --update_model_card`."
    )
    if measured:
        table += (
            "\n\nWhat was measured (held-out files come from the repositories the recipe below holds out: "
            "`eval_data_files`, or `eval_fraction` of them chosen by a hash of the repository name):\n" + measured
        )
    return f"{RESULTS_START}\n{table}\n{RESULTS_END}"


def _fim_example(checkpoint: str) -> str:
    return f'''```python
from transformers import AutoModelForCausalLM, AutoTokenizer

checkpoint = "{checkpoint}"
tokenizer = AutoTokenizer.from_pretrained(checkpoint)
model = AutoModelForCausalLM.from_pretrained(checkpoint)
before = "def mean(values):\\n    total = sum(values)\\n"
after = "\\n    return average\\n"
prompt = f"<fim_prefix>{{before}}<fim_suffix>{{after}}<fim_middle>"
inputs = tokenizer(prompt, return_tensors="pt")
stop = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<file_sep>"])
output = model.generate(**inputs, max_new_tokens=32, eos_token_id=stop, pad_token_id=stop[0])
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```'''


def _loss_curve_section(output_dir: str) -> str:
    """The run's loss curve (training/loss_curve.py) embedded, when it is in the folder the card describes."""
    if not os.path.exists(os.path.join(output_dir, LOSS_CURVE)):
        return ""
    return f"""
### Training curve

![Train and eval loss against tokens seen, the learning rate beneath]({LOSS_CURVE})
"""


def write_model_card(
    output_dir: str,
    recipe: dict,
    *,
    tokens_seen: int | None = None,
    eval_results: dict[str, dict] | None = None,
    model_name: str | None = None,
    hub_model_id: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """Write output_dir/README.md and return the card.

    recipe: the recipe's keys and values (e.g. `RecipeParser().load(path, overrides)`); keys naming tokens
    are left out. eval_results: nested by task, e.g. `{"fim": {"exact_match": 0.4, "exact_match/Python": 0.5}}`.
    """
    recipe = {key: value for key, value in recipe.items() if not key.endswith("token")}
    eval_results = eval_results or {}
    name = model_name or hub_model_id or os.path.basename(os.path.abspath(output_dir))
    base, architecture = recipe.get("model_name_or_path"), recipe.get("model_config")
    dataset = recipe.get("dataset_name_or_path")
    mixture = mixture_entries(recipe)
    source_line = f"`{dataset or recipe.get('prepared_data_dir', 'not recorded')}`"
    source_line = f"a mixture of {len(mixture)} sources (below)" if mixture else source_line
    hub_datasets = [d for d in [dataset] + [e.get("dataset_name_or_path") for e in mixture] if is_hub_id(d)]
    card_data = ModelCardData(
        model_name=name,
        base_model=base if is_hub_id(base) else None,
        license=license,
        datasets=list(dict.fromkeys(hub_datasets)) or None,
        language=["code"],
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["code", "starcoder2", "fill-in-the-middle", "starcoder2-train"],
        eval_results=model_index(eval_results) or None,
    )
    origin = f"continued from `{base}`" if base else f"trained from scratch with the `{architecture}` architecture"
    languages = ", ".join(recipe.get("languages") or []) or "every language in the data"
    tokens = f"{tokens_seen:,}" if tokens_seen is not None else "not recorded"
    defaults = {field: DataArguments.__dataclass_fields__[field].default for field in FIM_KEYS}
    fim_rows = "\n".join(f"| {key} | {recipe.get(key, defaults[key])} |" for key in FIM_KEYS)
    body = f"""
# {name}

A StarCoder2 code model, {origin}, with the starcoder2-train recipe below.

## Training data

- Dataset: {source_line}
- Languages: {languages}
- Tokens seen: {tokens}
- Sequence length: {recipe.get("seq_length", DataArguments.__dataclass_fields__["seq_length"].default)} tokens
{chr(10).join(data_steps(recipe))}
{mixture_table(mixture)}

## Fill-in-the-middle

StarCoder2's repository-context FIM: an example is a FIM candidate with probability `fim_rate`,
each of its files is then transformed with probability `fim_fragment_rate`, in SPM order with probability
`fim_spm_rate` (PSM otherwise); `fim_level` says whether whole files were cut before packing (`file`) or each
training window's files where they lay in it (`window`, as Fast-LLM trained StarCoder2-3B).

| setting | value |
|---|---|
{fim_rows}

## Evaluation

{_results_section(eval_results)}
{_loss_curve_section(output_dir)}
## Use: fill in the middle

{_fim_example(hub_model_id or output_dir)}

The structure tokens are parsed from the prompt text here. When `before` or `after` may contain text such as
`<fim_middle>` (code from elsewhere), tokenize the code with `split_special_tokens=True` and insert the
structure tokens by id.

## Recipe

```yaml
{yaml.safe_dump(recipe, sort_keys=False).strip()}
```
"""
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
    card.save(os.path.join(output_dir, "README.md"))
    return card


def update_model_card_results(output_dir: str, eval_results: dict[str, dict]) -> ModelCard:
    """Replace the evaluation results (metadata and table) of output_dir/README.md."""
    path = os.path.join(output_dir, "README.md")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no model card to update; training writes one with every saved model "
            "(starcoder2_train.model_card.write_model_card)."
        )
    card = ModelCard.load(path)
    if RESULTS_START not in card.text or RESULTS_END not in card.text:
        raise ValueError(
            f"{path}: has no evaluation section written by starcoder2_train; rewrite the card with write_model_card."
        )
    head, rest = card.text.split(RESULTS_START, 1)
    card.text = head + _results_section(eval_results) + rest.split(RESULTS_END, 1)[1]
    card.data.eval_results = model_index(eval_results) or None
    if card.data.eval_results and not card.data.model_name:
        card.data.model_name = os.path.basename(os.path.abspath(output_dir))
    card.save(path)
    return card
