"""Single-line infilling (FIM) exact match on held-out files, per language.

From each held-out file one non-blank line is masked (a seeded choice, stable for a given seed and path).
The model sees the PSM prompt `<fim_prefix>{before}<fim_suffix>{after}<fim_middle>` (or, with mode "spm", the SPM
prompt `<fim_prefix><fim_suffix>{after}<fim_middle>{before}`, StarCoder2's other training format) and generates
greedily, in batches, until `<|endoftext|>`, `<file_sep>` or the end of the line it writes; that line, stripped, must
equal the masked line, stripped (the SantaCoder-FIM scoring).

Where the hole starts: `{before}` stops at the end of the line before the masked one, and the newline that ends
that line is the first thing the model must write (`prompt_prefix`, `infilled_line`). A byte-level BPE with the
GPT-2 split (StarCoder2's, and ours) writes a newline and the indentation after it as one token (`"\n   "`,
`" return"`), so a prompt that ends in a bare newline asks for a token split that running code never has, and
only a model that met that split often enough in FIM training continues it; the newline in the hole keeps the
prompt on the boundaries of running code (docs/benchmarks.md measures both prompts on the same models). The first
token generated is constrained to one that starts with that newline (token healing, `generate_batched`'s
`first_texts`): the hole is a whole line, and a model trained with FIM cut at random characters has mostly seen
middles that continue the line they start in (measured: 75 of 155 infills of the quickstart model at 12458fb went
on writing the line before without it). After that token, decoding is free and greedy. `infilled_line` still
returns None for a generation that does not start with the newline (api.infill, a caller's own generations).

PSM is the default and what SantaCoder's and StarCoder's FIM results use. SPM puts the prefix right before the
middle it runs into, so the middle continues text the model has just read, where PSM asks it to find the prefix's
end on the far side of the suffix; a small model learns SPM first (docs/benchmarks.md: the quickstart model at
1,700 steps scores more in SPM than in PSM), which is why the quickstart recipe evaluates in SPM.

The structure tokens go in by their ids; the code is tokenized with special-token parsing off, so a file
that contains the text `<fim_middle>` is scored as code, not as a second FIM marker.
"""

import dataclasses
import random
from collections import defaultdict

from starcoder2_train.configs import FIM_EVAL_MODES
from starcoder2_train.data.tokens.tokenization import PieceTokenizer
from starcoder2_train.evaluation.generation import generate_batched
from starcoder2_train.evaluation.ranks import share, sum_across_ranks


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


def prompt_prefix(prefix: str) -> str:
    """The prefix as the prompt holds it: without the newline that ends the line before the hole."""
    return prefix[:-1] if prefix.endswith("\n") else prefix


def infilled_line(generated: str, prefix: str) -> str | None:
    """The line that `generated` writes into the hole after `prefix`: from the newline that it must start with (when
    the prompt left that newline out of the prefix) to the next newline; None when it does not start with that
    newline (it went on writing the line before)."""
    if prefix.endswith("\n"):
        if not generated.startswith("\n"):
            return None
        generated = generated[1:]
    return first_line(generated)


def fim_prompts(
    piece_tokenizer: PieceTokenizer, problems: list[FimProblem], max_prompt_tokens: int, mode: str = "psm"
) -> list[list[int]]:
    """The PSM (or SPM) prompt of each problem as ids, at most `max_prompt_tokens` long; the prefix as
    `prompt_prefix` gives it.

    When a file is too long, its prefix loses tokens at the start and its suffix at the end; each side keeps
    at least half of the room when it needs it, and the room one side does not use goes to the other.
    """
    if mode not in FIM_EVAL_MODES:
        raise ValueError(f"fim_prompts: mode {mode!r} is not one of {', '.join(FIM_EVAL_MODES)}.")
    room = max_prompt_tokens - 3
    if room < 2:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} leaves no room for code; raise it.")
    special = piece_tokenizer.special
    texts = [text for problem in problems for text in (prompt_prefix(problem.prefix), problem.suffix)]
    encoded = piece_tokenizer.encode_texts(texts)
    prompts = []
    for prefix, suffix in zip(encoded[0::2], encoded[1::2]):
        if len(prefix) + len(suffix) > room:
            keep_suffix = min(len(suffix), max(room // 2, room - len(prefix)))
            keep_prefix = room - keep_suffix
            prefix, suffix = prefix[len(prefix) - keep_prefix :] if keep_prefix else [], suffix[:keep_suffix]
        if mode == "spm":
            prompts.append([special.fim_prefix, special.fim_suffix, *suffix, special.fim_middle, *prefix])
        else:
            prompts.append([special.fim_prefix, *prefix, special.fim_suffix, *suffix, special.fim_middle])
    return prompts


def fim_generation_budget(seq_length: int) -> int:
    """New tokens an infill may take: 64 (a line of code), at most a quarter of the context."""
    return min(64, seq_length // 4)


def is_exact_match(line: str | None, expected: str) -> bool:
    """The FIM score of one infill: the line as written, leading and trailing whitespace aside (None: no line)."""
    return line is not None and line.strip() == expected.strip()


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
    mode: str = "psm",
    rank: int = 0,
    world_size: int = 1,
):
    """Exact match of greedy single-line infills, overall and per language.

    Returns {"exact_match", "problems", "exact_match/<language>", "problems/<language>"}; with
    `return_predictions`, also the list of (problem, infilled line) as a second value, the line None where the
    model went on writing the line before instead.
    max_prompt_tokens defaults to the model's max_position_embeddings less max_new_tokens. `mode`: "psm" or "spm"
    (the prompt's order, module docstring).
    Across ranks: every rank passes the same problems and infills problem i where i % world_size == rank (the
    shares padded to one length, evaluation/ranks.py); the hits and counts per language are summed over the ranks,
    and `return_predictions` gives this rank's own.
    """
    if not problems:
        raise ValueError("evaluate_fim: no problems; the held-out files have no line to mask.")
    languages = sorted({problem.language for problem in problems})
    mine = share(len(problems), rank, world_size)
    everything = problems
    problems = [problems[0 if index is None else index] for index in mine]  # None: a discarded padding item
    piece_tokenizer = PieceTokenizer(tokenizer)
    if max_prompt_tokens is None:
        max_prompt_tokens = model.config.max_position_embeddings - max_new_tokens
    prompts = fim_prompts(piece_tokenizer, problems, max_prompt_tokens, mode)
    special = piece_tokenizer.special
    generated = generate_batched(
        model,
        tokenizer,
        prompts,
        stop_token_ids=[special.eos, special.file_sep],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop_texts=("\n",),
        stop_texts_after=len("\n"),  # the newline that opens the hole is not the end of the line
        desc="FIM infills",
        first_texts=[problem.prefix[len(prompt_prefix(problem.prefix)) :] for problem in problems],
    )
    lines = [infilled_line(text, problem.prefix) for text, problem in zip(tokenizer.batch_decode(generated), problems)]
    hits, counts = defaultdict(int), defaultdict(int)
    for index, problem, line in zip(mine, problems, lines):
        if index is not None:
            counts[problem.language] += 1
            hits[problem.language] += is_exact_match(line, problem.middle)
    reduced = sum_across_ranks(
        [hits[key] for key in languages] + [counts[key] for key in languages], model.device, world_size
    )
    hits = dict(zip(languages, (round(value) for value in reduced[: len(languages)])))
    counts = dict(zip(languages, (round(value) for value in reduced[len(languages) :])))
    metrics = {"exact_match": sum(hits.values()) / len(everything), "problems": len(everything)}
    for language in languages:
        metrics[f"exact_match/{language}"] = hits[language] / counts[language]
        metrics[f"problems/{language}"] = counts[language]
    own = [(problem, line) for index, problem, line in zip(mine, problems, lines) if index is not None]
    return (metrics, own) if return_predictions else metrics
