"""What the evaluations cost, as a share of the training time between two of them: printed by `--dry_run true`.

The arithmetic, per rank (training and every evaluation task are split evenly across the ranks):
- F = model_flops_per_token(config, seq_length) (model/flops.py): training FLOPs per token, forward + backward;
  a forward alone is F/3. Recomputed layers (gradient checkpointing) are left out of training: the share is
  then an upper bound.
- training between two evaluations: eval_steps x tokens_per_step / world_size tokens, each F.
- the loss task: eval_tokens_per_language x languages tokens (the fewer of the recipe's `languages` and
  eval_languages; with neither, ASSUMED_LANGUAGES), forward only; an upper bound, as a language holds no more
  than its held-out files.
- the Trainer's eval_loss: eval_loss_windows x seq_length tokens, forward only (eval_loss_windows 0: the whole
  held-out split, eval_fraction of the corpus, which the dry run cannot know: said so, not counted).
- FIM prefill: fim_eval_problems x (seq_length - budget) prompt tokens (the longest prompt), forward only.
- FIM decoding: each rank runs ceil(ceil(problems / world_size) / per_device_eval_batch_size) batches of
  `budget` decode steps (fim_generation_budget, every row to the end: an upper bound). A decode step reads every
  weight once for a few rows, so it is bound by memory bandwidth, not FLOPs: it is charged as a forward over
  DECODE_STEP_TOKENS tokens. On an H100 (3.35 TB/s, 989 TFLOP/s dense bf16) at 40% MFU, reading 2 bytes a
  parameter takes as long as a forward (2 FLOPs a parameter) over 0.4 x 989 / 3.35 = 118 tokens; 128 is used
  (UNVERIFIED on a GPU: generate's per-step launch overhead may double it, still far under the bound).
share = (loss + eval_loss + FIM prefill tokens) / world_size x F/3 + decode steps x DECODE_STEP_TOKENS x F/3,
divided by the training FLOPs per rank. F cancels: the share is forward tokens / (3 x training tokens) per rank,
each evaluation token counted at the recipe's seq_length (a shorter loss window attends to fewer keys: an upper
bound). The goal for the StarCoder2 recipes is at most 2%.
"""

import math

from starcoder2_train.model.flops import model_flops_per_token

DECODE_STEP_TOKENS = 128  # forward tokens whose time one decode step takes (module docstring)
ASSUMED_LANGUAGES = 600  # The Stack v2's languages (600+), for a recipe without a language filter
GOAL = 0.02


def evaluation_steps(training_args) -> int | None:
    """Optimizer steps between two evaluations, as transformers reads eval_steps (a ratio of max_steps below 1;
    unset: logging_steps); None when the recipe does not evaluate by steps."""
    if str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "steps":
        return None
    steps = training_args.eval_steps or training_args.logging_steps
    if steps < 1:
        steps = math.ceil(steps * training_args.max_steps)
    return int(steps)


def evaluation_cost(config, data_args, training_args, *, world_size: int, tokens_per_step: int, fim_budget: int):
    """{"share", "lines"} for the recipe (module docstring), or {"share": None, "lines"} when it does not evaluate
    by steps."""
    steps = evaluation_steps(training_args)
    if steps is None:
        return {"share": None, "lines": ["evaluation: not by steps (eval_strategy), no cost between steps"]}
    flops = model_flops_per_token(config, data_args.seq_length)
    training = steps * tokens_per_step / world_size * flops
    tasks = set(training_args.eval_tasks)
    languages = min(len(data_args.languages or ()) or ASSUMED_LANGUAGES, training_args.eval_languages or math.inf)
    loss_tokens = training_args.eval_tokens_per_language * languages if "loss" in tasks else 0
    windows = training_args.eval_loss_windows
    trainer_tokens = windows * data_args.seq_length
    problems = training_args.fim_eval_problems if "fim" in tasks else 0
    prefill = problems * (data_args.seq_length - fim_budget)
    batches = math.ceil(math.ceil(problems / world_size) / training_args.per_device_eval_batch_size)
    decode = batches * fim_budget * DECODE_STEP_TOKENS
    forward_tokens = (loss_tokens + trainer_tokens + prefill) / world_size + decode
    share = forward_tokens * flops / 3 / training
    per_language = "languages" if data_args.languages or training_args.eval_languages else "languages assumed"
    lines = [
        f"evaluation every {steps:,} steps; per rank of {world_size}: training {steps:,} x {tokens_per_step:,} / "
        f"{world_size} = {steps * tokens_per_step / world_size:,.0f} tokens x {flops:.3g} FLOPs",
        f"  loss task {training_args.eval_tokens_per_language:,} x {languages} {per_language} = {loss_tokens:,} "
        f"tokens; Trainer eval_loss {windows:,} windows x {data_args.seq_length} = {trainer_tokens:,} tokens"
        + ("" if windows else " (eval_loss_windows 0: the whole held-out split, not counted: bound it)"),
        f"  FIM {problems:,} problems: prefill {problems:,} x {data_args.seq_length - fim_budget} = {prefill:,} "
        f"tokens; decode {batches} batch(es) x {fim_budget} steps x {DECODE_STEP_TOKENS} = {decode:,} "
        "forward-token equivalents per rank",
        f"  evaluation cost: {forward_tokens:,.0f} forward tokens per rank x {flops / 3:.3g} FLOPs = {share:.2%} of "
        f"the training time between two evaluations (goal <= {GOAL:.0%})"
        + ("" if share <= GOAL else "; lower eval_tokens_per_language, fim_eval_problems or raise eval_steps"),
    ]
    return {"share": share, "lines": lines}
