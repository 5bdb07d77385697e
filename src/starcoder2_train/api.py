"""The Python API: a recipe and a run in a few lines, in the same process, on one GPU or the CPU.

    from starcoder2_train import Recipe, ingest_code
    ingest_code("my_repos/", "data/mine")
    recipe = Recipe("recipes/starcoder2-3b/finetune_lora.yaml", dataset_name_or_path="data/mine", max_steps=200)
    data = recipe.prepare_data()          # packed windows, as training reads them
    print(recipe.show_samples(data, 1)[0])
    trainer = recipe.train()              # the same run as scripts/run_pretrain.py RECIPE
    merged = recipe.merge_adapter()       # LoRA: OUTPUT_DIR/adapter → OUTPUT_DIR/merged
    recipe.push(merged, "me/starcoder2-3b-mine")

`Recipe` holds a recipe file (or none: the defaults) and the values changed on top of it; every change is checked
by the same parser as the scripts' (unknown keys and wrong types are refused naming the key), and `arguments()`
parses them into the model, data and training dataclasses. The scripts are thin users of the same functions:
scripts/run_pretrain.py of run.py's `run_training`, scripts/ingest.py of data/sources/local/ingest.py,
scripts/merge_adapter.py of model/lora.py. Nothing here needs `accelerate launch`; a Trainer built in a notebook
uses the one device it finds.
"""

import copy
import os

from starcoder2_train.configs import RecipeError
from starcoder2_train.recipe import RecipeParser, to_words


class Recipe:
    """A recipe file (optional) plus values set on top of it, e.g. `Recipe(path, max_steps=50).set(seed=1)`."""

    def __init__(self, path: str | os.PathLike | None = None, **values):
        if path is not None and not os.path.isfile(path):
            raise RecipeError(f"recipe {path}: no such file.")
        self.path = None if path is None else os.fspath(path)
        self.overrides: dict = {}
        self._data = None
        self.set(**values)

    def set(self, **values) -> "Recipe":
        """Change keys (checked now: an unknown key or a value of the wrong type is refused naming it)."""
        changed = dict(self.overrides, **values)
        self._parse(changed)
        self.overrides, self._data = changed, None
        return self

    @property
    def values(self) -> dict:
        """The merged recipe: the file's keys, then the values set here."""
        return RecipeParser().load(self.path, to_words(self.overrides))

    def __getitem__(self, key: str):
        return self.values[key]

    def __repr__(self) -> str:
        lines = [f"Recipe({self.path!r})"] + [f"  {key}: {value!r}" for key, value in self.values.items()]
        return "\n".join(lines)

    def _parse(self, overrides: dict):
        parser = RecipeParser()
        arguments = parser.parse(([self.path] if self.path else []) + to_words(overrides))
        return parser, arguments

    def arguments(self):
        """(ModelArguments, DataArguments, PretrainingArguments, recipe values) of this recipe, freshly parsed."""
        parser, (model_args, data_args, training_args) = self._parse(self.overrides)
        return model_args, data_args, training_args, parser.recipe_values

    @property
    def output_dir(self) -> str:
        return self.arguments()[2].output_dir

    def tokenizer(self):
        from starcoder2_train.data.tokens.tokenizer import load_tokenizer

        return load_tokenizer(self.arguments()[1].tokenizer_name_or_path)

    def prepare_data(self):
        """The run's data (run.py's RunData: packed training windows and their report, the held-out
        windows and evaluation inputs), built as training builds them and cached by datasets."""
        from starcoder2_train.data.store.manifest import check_prepared_sources
        from starcoder2_train.run import build_data

        _, data_args, training_args, _ = self.arguments()
        tokenizer = self.tokenizer()
        check_prepared_sources(data_args, tokenizer)  # a prepared store of other settings: refused
        self._data = build_data(data_args, tokenizer, training_args)
        return self._data

    def show_samples(self, data=None, count: int = 2, max_chars: int = 2000, scan: int = 500) -> list[str]:
        """`count` packed training windows decoded with their special tokens, as the model sees them: among the
        first `scan` windows (in training order) of the first data epoch, those holding a FIM sentinel first,
        then those with a file boundary (`<file_sep>`), so that the FIM format and repository context show; each
        cut to `max_chars` characters."""
        from starcoder2_train.data.special_tokens import SpecialTokenIds

        data = data or self._data or self.prepare_data()
        tokenizer = self.tokenizer()
        special = SpecialTokenIds.from_tokenizer(tokenizer)
        dataset = data.train_dataset
        first_epoch = getattr(dataset, "starts", [0, len(dataset)])[1]  # DataEpochs: do not make epoch 1 for this
        windows = [dataset[index]["input_ids"] for index in range(min(scan, first_epoch, len(dataset)))]
        windows = [list(map(int, ids)) for ids in windows]
        # FIM-transformed windows first, then those with a file boundary; stable: training order within each
        windows.sort(key=lambda ids: (special.fim_prefix not in ids, special.file_sep not in ids))
        return [tokenizer.decode(ids)[:max_chars] for ids in windows[:count]]

    def dry_run(self) -> None:
        """Print the model size, tokens per step and the per-GPU memory plan, without training."""
        self.train(dry_run=True)

    def train(self, **values):
        """Run the recipe (with `values` set first); returns the Trainer (its `state.log_history` holds the losses)."""
        from starcoder2_train.run import run_training

        if values:
            self.set(**values)
        parser, (model_args, data_args, training_args) = self._parse(self.overrides)
        return run_training(
            model_args,
            data_args,
            training_args,
            parser.recipe_values,
            dry_run_bf16=parser.dry_run_bf16,
            cpu_fallback=parser.cpu_fallback,
        )

    def final_model_dir(self) -> str:
        """OUTPUT_DIR, or OUTPUT_DIR/adapter for a LoRA recipe."""
        from starcoder2_train.run import final_model_dir

        model_args, _, training_args, _ = self.arguments()
        return final_model_dir(model_args, training_args)

    def merge_adapter(self, output_dir: str | None = None, dtype=None) -> str:
        """LoRA: merge OUTPUT_DIR/adapter into its base, saved as a plain model (default OUTPUT_DIR/merged)."""
        from starcoder2_train.model.lora import merge_adapter

        model_args, _, training_args, _ = self.arguments()
        if not model_args.use_lora:
            raise RecipeError("use_lora: this recipe trains the whole model; there is no adapter to merge.")
        target = output_dir or os.path.join(training_args.output_dir, "merged")
        return merge_adapter(self.final_model_dir(), target, dtype=dtype)

    def evaluate(self, model_dir: str | None = None, tasks=("loss", "fim"), max_fim_problems: int | None = 100):
        """Loss per language and FIM exact match on the recipe's held-out repositories, as training's evaluation
        scores them, of `model_dir` (default: OUTPUT_DIR/merged when there is one, else the final model)."""
        return evaluate_model(self, model_dir, tasks, max_fim_problems)

    def push(self, model_dir: str, repo_id: str, *, private: bool = False, dry_run_dir: str | None = None) -> str:
        """Upload a saved model folder to the Hub (huggingface_hub; `dry_run_dir` writes what would be uploaded)."""
        from starcoder2_train.hub.upload import push_to_hub

        return push_to_hub(model_dir, repo_id, private=private, dry_run_dir=dry_run_dir)

    def copy(self) -> "Recipe":
        return copy.deepcopy(self)


def ingest_code(
    folder: str | os.PathLike, output_dir: str | os.PathLike, *, one_per_subfolder: bool | None = None, **options
) -> dict:
    """A folder of code → Stack v2-format shards in `output_dir`, as scripts/ingest.py writes them; returns the
    summary (what was kept, and what was skipped and why). Each sub-folder of `folder` is one repository
    (`one_per_subfolder`); by default that is so when `folder` holds only folders, and `folder` is itself one
    repository when it holds files too. `options`: ingest's (max_file_bytes, overwrite, exclude_dirs, ...)."""
    from starcoder2_train.data.sources.local.ingest import ingest

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise RecipeError(f"{folder}: not a directory; give the folder of your repositories.")
    entries = [entry for entry in os.scandir(folder) if not entry.name.startswith(".")]
    if one_per_subfolder is None:
        one_per_subfolder = bool(entries) and all(entry.is_dir() for entry in entries)
    paths = sorted(entry.path for entry in entries if entry.is_dir()) if one_per_subfolder else [folder]
    summary, _ = ingest(paths, os.fspath(output_dir), **options)
    return summary


def load_model(model_dir: str, device: str | None = None):
    """(model, tokenizer) of a saved model folder, on `device` (CUDA when there is one), ready to generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def infill(model, tokenizer, prefix: str, suffix: str, max_new_tokens: int = 64) -> str:
    """Greedy PSM infilling of the code between `prefix` and `suffix` (the FIM evaluation's prompt), up to
    <|endoftext|>, <file_sep> or `max_new_tokens`: `prefix + infill(...) + suffix` is the filled file.

    As in the FIM evaluation, a prefix that ends in a newline goes into the prompt without it and the first token
    generated starts with it (token healing: evaluation/fim.py says why); the text returned starts after that
    newline."""
    from starcoder2_train.data.tokens.tokenization import PieceTokenizer
    from starcoder2_train.evaluation.fim import FimProblem, fim_prompts
    from starcoder2_train.evaluation.generation import generate_batched

    pieces = PieceTokenizer(tokenizer)
    room = model.config.max_position_embeddings - max_new_tokens
    prompt = fim_prompts(pieces, [FimProblem("", "", prefix, "", suffix)], room)
    stops = [pieces.special.eos, pieces.special.file_sep]
    healed = "\n" if prefix.endswith("\n") else ""
    generated = generate_batched(
        model, tokenizer, prompt, stop_token_ids=stops, max_new_tokens=max_new_tokens, batch_size=1,
        disable_progress=True, first_texts=[healed],
    )  # fmt: skip
    text = tokenizer.decode(generated[0], skip_special_tokens=True)
    return text[1:] if prefix.endswith("\n") and text.startswith("\n") else text


def evaluate_model(recipe: Recipe, model_dir: str | None, tasks, max_fim_problems: int | None) -> dict:
    from starcoder2_train.evaluation.fim import fim_generation_budget
    from starcoder2_train.evaluation.held_out import score_tasks

    data = recipe._data or recipe.prepare_data()  # the held-out inputs come with the run's data
    if model_dir is None:
        merged = os.path.join(recipe.output_dir, "merged")
        model_dir = merged if os.path.isdir(merged) else recipe.final_model_dir()
    model, tokenizer = load_model(model_dir)
    _, data_args, training_args, _ = recipe.arguments()
    loss_rows = data.loss_rows if "loss" in tasks and data.loss_rows else None
    problems = data.fim_problems if "fim" in tasks else []
    return score_tasks(
        model,
        tokenizer,
        loss_rows,
        problems[:max_fim_problems] if max_fim_problems else problems,
        seq_length=data_args.seq_length,
        batch_size=training_args.per_device_eval_batch_size,
        max_new_tokens=fim_generation_budget(data_args.seq_length),
        fim_mode=training_args.fim_eval_mode,
    )
