"""The held-out files, and what the evaluation tasks make of them: one meaning of "held-out" everywhere.

Training-time evaluation (`EvaluationCallback`) and `scripts/evaluate.py --recipe` take the same held-out
repositories (`data.splits.load_split_repositories(data_args, "eval")`: `eval_data_files`, or the
`eval_fraction` hold-out of the recipe's data after the recipe's filters) and turn them into the same rows
here, so that a loss logged during training and the loss the script prints are the same measurement under
the same names:

- `held_out_files`: every file of those repositories, `path` as `repo_name/path` (the FIM line choice is
  seeded by it), in the repositories' order; optionally at most `limit` files per language.
- `loss_rows`: each file scored alone, as StarCoder2 trains a one-file repository without metadata:
  `<file_sep>code<|endoftext|>`, no FIM; the loss is per token of the file (evaluation/loss.py).
- `fim_problems`: `lines_per_file` masked lines per file (evaluation/fim.py), at most `max_problems`.

These are not the Trainer's own `eval_loss`, which is computed on packed windows of held-out repository
examples with repository context and FIM, as in training (`scripts/run_pretrain.py` logs both).
Cost: the held-out files' text in memory on every rank, eval_fraction × the corpus (0.03 of 1 TB of code is
30 GB): at scale give small `eval_data_files`, or cap the files with `limit`.
"""

from collections import defaultdict

from starcoder2_train.data.tokens.tokenization import PieceTokenizer
from starcoder2_train.evaluation.fim import FimProblem, build_fim_problems, evaluate_fim
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
) -> dict[str, dict]:
    """{"loss": ..., "fim": ...} of a model on the held-out task inputs (`loss_rows` None or `fim_problems` empty:
    that task is not run), nested by task; what training's EvaluationCallback logs and the notebook API returns."""
    results = {}
    if loss_rows is not None:
        results["loss"] = evaluate_loss(model, loss_rows, seq_length=seq_length, batch_size=batch_size)
    if fim_problems:
        results["fim"] = evaluate_fim(
            model,
            tokenizer,
            fim_problems,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            max_prompt_tokens=seq_length - max_new_tokens,
            mode=fim_mode,
        )
    return results
