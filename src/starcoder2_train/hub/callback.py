"""`ModelCardCallback`: a model card in every checkpoint the Trainer saves, and optionally its upload."""

import os

from transformers import TrainerCallback

from starcoder2_train.hub.model_card import write_model_card
from starcoder2_train.hub.upload import push_to_hub


class ModelCardCallback(TrainerCallback):
    """Write the model card into each checkpoint the Trainer saves; with `push_checkpoints`, upload it too.

        ModelCardCallback(recipe, tokens_per_step=..., evaluation=evaluation_callback, hub_model_id="me/model")

    Use it instead of TrainingArguments.push_to_hub, whose upload writes the Trainer's own README.
    tokens seen: the Trainer's count when it keeps one (include_num_input_tokens_seen), else
    global_step * tokens_per_step. evaluation: an EvaluationCallback, whose latest results go into the card.
    """

    def __init__(
        self,
        recipe: dict,
        *,
        tokens_per_step: int | None = None,
        evaluation=None,
        hub_model_id: str | None = None,
        private: bool = False,
        push_checkpoints: bool = False,
    ):
        if push_checkpoints and not hub_model_id:
            raise ValueError("ModelCardCallback: push_checkpoints needs hub_model_id.")
        self.recipe, self.tokens_per_step, self.evaluation = recipe, tokens_per_step, evaluation
        self.hub_model_id, self.private, self.push_checkpoints = hub_model_id, private, push_checkpoints

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        tokens = state.num_input_tokens_seen or (
            state.global_step * self.tokens_per_step if self.tokens_per_step else None
        )
        results = self.evaluation.latest_results if self.evaluation is not None else None
        write_model_card(
            checkpoint, self.recipe, tokens_seen=tokens, eval_results=results, hub_model_id=self.hub_model_id
        )
        if self.push_checkpoints:
            push_to_hub(
                checkpoint, self.hub_model_id, private=self.private, revision=f"checkpoint-{state.global_step}"
            )
