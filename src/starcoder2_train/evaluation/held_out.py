"""The held-out files, and what the evaluation tasks make of them: one meaning of "held-out" everywhere.

Training-time evaluation (`EvaluationCallback`) and `scripts/evaluate.py --recipe` take the same held-out
repositories (`data.splits.load_split_repositories(data_args, "eval")`: `eval_data_files`, or the
`eval_fraction` hold-out of the recipe's data after the recipe's filters) and turn them into the same rows
and problems, so that a loss logged during training and the loss the script prints are the same measurement
under the same names:

- `bounded_task_inputs` (training and `evaluate.py --recipe`): the held-out set of evaluation/held_out_set.py,
  `eval_tokens_per_language` tokens of files drawn by seed across repositories and `fim_eval_problems` problems
  drawn across languages and repositories, built once per machine and memory-mapped by every rank.
- `task_inputs` (`evaluate.py --data`, one process): every file, or at most `limit` per language in the
  repositories' order, as Python rows.
- Loss rows: each file scored alone, as StarCoder2 trains a one-file repository without metadata:
  `<file_sep>code<|endoftext|>`, no FIM; the loss is per token of the file (evaluation/loss.py).
- FIM problems: `lines_per_file` masked lines per file (evaluation/fim.py).

These are not the Trainer's own `eval_loss`, which is computed on packed windows of held-out repository
examples with repository context and FIM, as in training (`scripts/run_pretrain.py` logs both).
"""

import os
import random
from collections import defaultdict

import torch

from starcoder2_train.data.tokens.tokenization import PieceTokenizer
from starcoder2_train.evaluation.fim import FimProblem, build_fim_problems, evaluate_fim
from starcoder2_train.evaluation.held_out_set import ensure_held_out_set
from starcoder2_train.evaluation.loss import evaluate_loss


def held_out_files(repositories, limit: int | None = None) -> list[dict]:
    """{path: "repo_name/path", content, language} for every file of `repositories`; at most `limit` per language."""
    files, per_language = [], defaultdict(int)
    for repository in repositories:
        for file in repository["files"]:
            language = file["language"] or "unknown"
            if limit is None or per_language[language] < limit:
                per_language[language] += 1
                path = f"{repository['repo_name']}/{file['path']}"
                files.append({"path": path, "content": file["content"], "language": language})
    return files


def loss_rows(tokenizer, files: list[dict]) -> list[dict]:
    """{input_ids: <file_sep> + code + <|endoftext|>, language} of each file; code never parsed for special tokens."""
    pieces = PieceTokenizer(tokenizer)
    special = pieces.special
    return [
        {"input_ids": [special.file_sep, *ids, special.eos], "language": file["language"]}
        for ids, file in zip(pieces.encode_texts([file["content"] for file in files]), files)
    ]


def fim_problems(
    files: list[dict], seed: int, max_problems: int | None = None, lines_per_file: int = 1
) -> list[FimProblem]:
    """`lines_per_file` single-line FIM problems per file with eligible lines, the lines chosen by (seed, path);
    the first `max_problems` of them."""
    return build_fim_problems(files, seed=seed, problems_per_file=lines_per_file)[:max_problems]


def task_inputs(
    repositories,
    tokenizer,
    tasks,
    *,
    seed: int,
    max_fim_problems: int | None = None,
    fim_lines_per_file: int = 1,
    limit: int | None = None,
) -> tuple[list[dict] | None, list[FimProblem]]:
    """(loss rows or None, FIM problems) of the held-out `repositories` (None: no held-out data) for `tasks`."""
    files = held_out_files(repositories, limit) if repositories is not None else []
    rows = loss_rows(tokenizer, files) if "loss" in tasks and files else None
    problems = fim_problems(files, seed, max_fim_problems, lines_per_file=fim_lines_per_file) if "fim" in tasks else []
    return rows, problems


def cache_dir(training_args) -> str:
    """Where the held-out set is built: eval_cache_dir, else OUTPUT_DIR/held_out."""
    return training_args.eval_cache_dir or os.path.join(training_args.output_dir, "held_out")


def drawn_windows(eval_dataset, count: int, seed: int):
    """The Trainer's packed held-out windows (its eval_loss), at most `count` of them drawn by `seed` and kept in
    their order (a torch Subset); all of them when `count` is 0 or not below their number."""
    if eval_dataset is None or not count or len(eval_dataset) <= count:
        return eval_dataset
    return torch.utils.data.Subset(eval_dataset, sorted(random.Random(seed).sample(range(len(eval_dataset)), count)))


def bounded_task_inputs(
    repositories,
    tokenizer,
    tasks,
    *,
    cache_dir: str,
    seed: int,
    tokens_per_language: int,
    max_fim_problems: int,
    fim_lines_per_file: int = 1,
    languages: int = 0,
):
    """(loss rows or None, FIM problems) of the held-out set of `repositories` (None or empty: (None, [])), built
    under `cache_dir` by one process per machine (held_out_set.ensure_held_out_set); the rows memory-mapped."""
    if repositories is None or len(repositories) == 0 or not ({"loss", "fim"} & set(tasks)):
        return None, []
    built = ensure_held_out_set(
        repositories,
        tokenizer,
        cache_dir,
        seed=seed,
        tokens_per_language=tokens_per_language if "loss" in tasks else 1,
        fim_problems=max_fim_problems if "fim" in tasks else 0,
        fim_lines_per_file=fim_lines_per_file,
        languages=languages,
    )
    return (built.loss_rows if "loss" in tasks else None), (built.fim_problems() if "fim" in tasks else [])


def recipe_task_inputs(repositories, tokenizer, training_args, tasks, *, seed: int, fim_lines_per_file: int):
    """`bounded_task_inputs` with the recipe's bounds (eval_tokens_per_language, eval_languages, fim_eval_problems)
    and cache folder: the one reading of those keys, for training (run.py) and `evaluate.py --recipe`."""
    return bounded_task_inputs(
        repositories,
        tokenizer,
        tasks,
        cache_dir=cache_dir(training_args),
        seed=seed,
        tokens_per_language=training_args.eval_tokens_per_language,
        languages=training_args.eval_languages,
        max_fim_problems=training_args.fim_eval_problems,
        fim_lines_per_file=fim_lines_per_file,
    )


def score_tasks(
    model,
    tokenizer,
    loss_rows,
    fim_problems,
    *,
    seq_length: int,
    batch_size: int,
    max_new_tokens: int,
    fim_mode: str = "psm",
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, dict]:
    """{"loss": ..., "fim": ...} of a model on the held-out task inputs (`loss_rows` None or `fim_problems` empty:
    that task is not run), nested by task; what training's EvaluationCallback logs and the notebook API returns.
    With `world_size` ranks, each scores its share and the sums are reduced (evaluation/ranks.py)."""
    results = {}
    if loss_rows is not None:
        results["loss"] = evaluate_loss(
            model, loss_rows, seq_length=seq_length, batch_size=batch_size, rank=rank, world_size=world_size
        )
    if fim_problems:
        results["fim"] = evaluate_fim(
            model,
            tokenizer,
            fim_problems,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            max_prompt_tokens=seq_length - max_new_tokens,
            mode=fim_mode,
            rank=rank,
            world_size=world_size,
        )
    return results
