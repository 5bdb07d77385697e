"""Batched generation for the evaluation tasks: left padding, stop tokens and stop texts.

Prompts are token ids made by the caller, with source text encoded by tokenization.PieceTokenizer
(special-token parsing off, so that code containing the text `<fim_middle>` never yields that id).
"""

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from starcoder2_train.progress import progress


class StopOnTexts(StoppingCriteria):
    """Finish a row once its generated text, from character `after` on, contains any of `stop_texts`.

    Only the last `window` generated tokens are decoded at each step: enough for stop texts of a few
    characters, and it keeps each step's cost independent of the length generated so far.
    """

    def __init__(self, tokenizer, prompt_length: int, stop_texts, window: int = 16, after: int = 0):
        self.tokenizer, self.prompt_length, self.stop_texts, self.window = tokenizer, prompt_length, stop_texts, window
        self.after = after

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_length :]
        tails = self.tokenizer.batch_decode(generated[:, -self.window :])
        if generated.shape[1] <= self.window:  # the tails are the whole generations: skip their first characters
            tails = [tail[self.after :] for tail in tails]
        return torch.tensor(
            [any(stop in tail for stop in self.stop_texts) for tail in tails],
            dtype=torch.bool,
            device=input_ids.device,
        )


@torch.no_grad()
def generate_batched(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    stop_token_ids: list[int],
    max_new_tokens: int,
    batch_size: int,
    stop_texts: tuple[str, ...] = (),
    stop_texts_after: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    pad_token_id: int | None = None,
    desc: str = "generating",
    disable_progress: bool | None = None,
    first_texts: list[str] | None = None,
) -> list[list[int]]:
    """Generate after each prompt, `batch_size` prompts at a time; the new ids of each, in order. A progress bar
    (`desc`, prompts per second and ETA; quiet off a terminal or with `disable_progress`) counts the prompts.

    Prompts are sorted by length so that a batch holds similar lengths, then left-padded (the attention
    mask covers the pads; generate derives position ids from it). Each result is cut before its first
    stop token; rows that hit a stop text end there (the caller cuts the text at it). A stop text within the first
    `stop_texts_after` characters of a generation does not end it (the newline that opens a FIM hole, say).

    `first_texts`, one string per prompt ("" for none), constrains the first new token of that prompt to a token
    whose text starts with the string: token healing, for a prompt that leaves out text the answer is known to begin
    with (the newline that opens a FIM hole: evaluation/fim.py says why it is left out). transformers'
    `prefix_allowed_tokens_fn` applies it; the allowed ids are found once per call by decoding the vocabulary
    (49,152 single-token decodes for StarCoder2's, well under a second).

    Sampling (`do_sample`) passes temperature, top_p and top_k to generate explicitly; top_k 0 is no top-k filter.
    Left out or None, transformers 5.25 would fill each from the model's generation_config, then from its own
    defaults (`GenerationConfig._get_default_generation_params`: top_k 50), in `_prepare_generation_config`;
    bigcode-evaluation-harness passes all three (its top_k default is 0).
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("generate_batched: batch_size and max_new_tokens must be at least 1.")
    pad_token_id = stop_token_ids[0] if pad_token_id is None else pad_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        eos_token_id=list(stop_token_ids),
        pad_token_id=pad_token_id,
        bos_token_id=None,
        **({"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}),
    )
    was_training, model_device = model.training, model.device
    model.eval()
    order = sorted(range(len(prompts)), key=lambda index: -len(prompts[index]))
    outputs: list[list[int]] = [[] for _ in prompts]
    stop_set = set(stop_token_ids)
    allowed_first = _tokens_starting_with(tokenizer, set(first_texts or ()) - {""})
    every_id = torch.arange(len(tokenizer))
    bar = progress(desc=desc, total=len(prompts), unit="prompt", disable=disable_progress)
    try:
        for start in range(0, len(order), batch_size):
            batch = [prompts[index] for index in order[start : start + batch_size]]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[pad_token_id] * (width - len(ids)) + list(ids) for ids in batch])
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
            criteria = StoppingCriteriaList(
                [StopOnTexts(tokenizer, width, stop_texts, after=stop_texts_after)] if stop_texts else []
            )
            firsts = [first_texts[index] for index in order[start : start + batch_size]] if first_texts else None

            def allowed(row: int, ids: torch.Tensor, firsts=firsts, width=width) -> torch.Tensor:
                return allowed_first[firsts[row]] if firsts[row] and ids.shape[0] == width else every_id

            sequences = model.generate(
                input_ids=input_ids.to(model_device),
                attention_mask=attention_mask.to(model_device),
                generation_config=config,
                stopping_criteria=criteria,
                prefix_allowed_tokens_fn=allowed if firsts and any(firsts) else None,
            )
            for index, row in zip(order[start : start + batch_size], sequences[:, width:].tolist()):
                cut = next((position for position, token in enumerate(row) if token in stop_set), len(row))
                outputs[index] = row[:cut]
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return outputs


def _tokens_starting_with(tokenizer, texts: set[str]) -> dict[str, torch.Tensor]:
    """For each text, the ids of the ordinary (not special) tokens whose decoded text starts with it."""
    if not texts:
        return {}
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    pieces = tokenizer.batch_decode([[token] for token in range(len(tokenizer))])
    allowed = {}
    for text in texts:
        ids = [token for token, piece in enumerate(pieces) if piece.startswith(text) and token not in special]
        if not ids:
            raise ValueError(
                f"generate_batched: no token of the tokenizer starts with {text!r}; drop it from first_texts."
            )
        allowed[text] = torch.tensor(ids)
    return allowed
