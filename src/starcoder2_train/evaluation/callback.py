"""`EvaluationCallback`: the cheap tasks (loss, FIM) at every Trainer evaluation, logged like its metrics.

Results are nested by task, `{"loss": {"loss/Python": ...}, "fim": {...}}`, exactly as scripts/evaluate.py
returns them; `flatten_results` turns them into log keys such as `eval_fim/exact_match/Python`.
"""

from transformers import TrainerCallback

from starcoder2_train.evaluation.fim import FimProblem
from starcoder2_train.evaluation.held_out import score_tasks


def flatten_results(results: dict[str, dict], prefix: str = "eval_") -> dict[str, float]:
    """{"fim": {"exact_match": 0.5}} -> {"eval_fim/exact_match": 0.5}."""
    return {f"{prefix}{task}/{key}": value for task, metrics in results.items() for key, value in metrics.items()}


class EvaluationCallback(TrainerCallback):
    """After each Trainer evaluation, score held-out loss per language and FIM exact match, and log them.

        trainer.add_callback(EvaluationCallback(trainer, tokenizer, loss_dataset=rows, fim_problems=problems,
                                                seq_length=data_args.seq_length))

    Each process scores its share of the loss windows and FIM problems (`args.process_index` of
    `args.world_size`; every rank makes the same number of model calls, which a ZeRO-3 model needs) and the sums
    are reduced across ranks (evaluation/ranks.py); only the main process logs.
    `latest_results` keeps the last results, nested by task, for the model card.
    """

    def __init__(
        self,
        trainer,
        tokenizer,
        *,
        loss_dataset=None,
        fim_problems: list[FimProblem] | None = None,
        seq_length: int,
        batch_size: int | None = None,
        max_new_tokens: int = 64,
        fim_mode: str = "psm",
    ):
        if loss_dataset is None and not fim_problems:
            raise ValueError("EvaluationCallback: give loss_dataset, fim_problems or both.")
        self.trainer, self.tokenizer = trainer, tokenizer
        self.loss_dataset, self.fim_problems = loss_dataset, fim_problems
        self.seq_length, self.batch_size, self.max_new_tokens = seq_length, batch_size, max_new_tokens
        self.fim_mode = fim_mode
        self.latest_results: dict[str, dict] = {}

    def on_evaluate(self, args, state, control, **kwargs):
        results = score_tasks(
            self.trainer.model,
            self.tokenizer,
            self.loss_dataset,
            self.fim_problems,
            seq_length=self.seq_length,
            batch_size=self.batch_size or args.per_device_eval_batch_size,
            max_new_tokens=self.max_new_tokens,
            fim_mode=self.fim_mode,
            rank=args.process_index,
            world_size=args.world_size,
        )
        self.latest_results = results
        self.trainer.log(flatten_results(results))
