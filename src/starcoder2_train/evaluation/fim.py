"""Single-line infilling (FIM) exact match on held-out files, per language.

From each held-out file one non-blank line is masked (a seeded choice, stable for a given seed and path).
The model sees the PSM prompt `<fim_prefix>{before}<fim_suffix>{after}<fim_middle>` and generates greedily,
in batches, until `<|endoftext|>`, `<file_sep>` or a newline; the text up to the first newline, stripped, must
equal the masked line, stripped (the SantaCoder-FIM scoring).

The structure tokens go in by their ids; the code is tokenized with special-token parsing off, so a file
that contains the text `<fim_middle>` is scored as code, not as a second FIM marker.
"""

import dataclasses
import random
from collections import defaultdict

from starcoder2_train.data.tokenization import PieceTokenizer
from starcoder2_train.evaluation.generation import generate_batched


@dataclasses.dataclass(frozen=True)
class FimProblem:
    path: str
    language: str
    prefix: str  # the file up to the start of the masked line
    middle: str  # the masked line, without its newline
    suffix: str  # from the newline that ends the masked line (or "" at the end of the file)


def build_fim_problems(
    files: list[dict], *, seed: int = 0, problems_per_file: int = 1, min_line_chars: int = 3
) -> list[FimProblem]:
    """Mask lines of held-out files: dicts with `path`, `content` and `language`.

    Lines whose stripped text is shorter than `min_line_chars` (a lone `}`, say) are never chosen; a file
    without an eligible line gives no problem. The choice depends on (seed, path) only.
    """
    problems = []
    for file in files:
        lines = file["content"].splitlines(keepends=True)
        eligible = [number for number, line in enumerate(lines) if len(line.strip()) >= min_line_chars]
        chosen = random.Random(f"{seed}/{file['path']}").sample(eligible, min(problems_per_file, len(eligible)))
        for number in sorted(chosen):
            line = lines[number]
            body = line.rstrip("\r\n")
            problems.append(
                FimProblem(
                    path=file["path"],
                    language=file["language"],
                    prefix="".join(lines[:number]),
                    middle=body,
                    suffix=line[len(body) :] + "".join(lines[number + 1 :]),
                )
            )
    return problems


def fim_prompts(
    piece_tokenizer: PieceTokenizer, problems: list[FimProblem], max_prompt_tokens: int
) -> list[list[int]]:
    """The PSM prompt of each problem as ids, at most `max_prompt_tokens` long.

    When a file is too long, its prefix loses tokens at the start and its suffix at the end; each side keeps
    at least half of the room when it needs it, and the room one side does not use goes to the other.
    """
    room = max_prompt_tokens - 3
    if room < 2:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} leaves no room for code; raise it.")
    special = piece_tokenizer.special
    encoded = piece_tokenizer.encode_texts([text for problem in problems for text in (problem.prefix, problem.suffix)])
    prompts = []
    for prefix, suffix in zip(encoded[0::2], encoded[1::2]):
        if len(prefix) + len(suffix) > room:
            keep_suffix = min(len(suffix), max(room // 2, room - len(prefix)))
            keep_prefix = room - keep_suffix
            prefix, suffix = prefix[len(prefix) - keep_prefix :] if keep_prefix else [], suffix[:keep_suffix]
        prompts.append([special.fim_prefix, *prefix, special.fim_suffix, *suffix, special.fim_middle])
    return prompts


def fim_generation_budget(seq_length: int) -> int:
    """New tokens an infill may take: 64 (a line of code), at most a quarter of the context."""
    return min(64, seq_length // 4)


def first_line(text: str) -> str:
    return text.split("\n", 1)[0]


def evaluate_fim(
    model,
    tokenizer,
    problems: list[FimProblem],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_prompt_tokens: int | None = None,
    return_predictions: bool = False,
):
    """Exact match of greedy single-line infills, overall and per language.

    Returns {"exact_match", "problems", "exact_match/<language>", "problems/<language>"}; with
    `return_predictions`, also the list of (problem, predicted line) as a second value.
    max_prompt_tokens defaults to the model's max_position_embeddings less max_new_tokens.
    """
    if not problems:
        raise ValueError("evaluate_fim: no problems; the held-out files have no line to mask.")
    piece_tokenizer = PieceTokenizer(tokenizer)
    if max_prompt_tokens is None:
        max_prompt_tokens = model.config.max_position_embeddings - max_new_tokens
    prompts = fim_prompts(piece_tokenizer, problems, max_prompt_tokens)
    special = piece_tokenizer.special
    generated = generate_batched(
        model,
        tokenizer,
        prompts,
        stop_token_ids=[special.eos, special.file_sep],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop_texts=("\n",),
        desc="FIM infills",
    )
    predictions = [first_line(text) for text in tokenizer.batch_decode(generated)]
    hits, counts = defaultdict(int), defaultdict(int)
    for problem, prediction in zip(problems, predictions):
        counts[problem.language] += 1
        hits[problem.language] += prediction.strip() == problem.middle.strip()
    metrics = {"exact_match": sum(hits.values()) / len(problems), "problems": len(problems)}
    for language in sorted(counts):
        metrics[f"exact_match/{language}"] = hits[language] / counts[language]
        metrics[f"problems/{language}"] = counts[language]
    return (metrics, list(zip(problems, predictions))) if return_predictions else metrics
