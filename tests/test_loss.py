import pytest
import torch
from transformers import AutoModelForCausalLM, Starcoder2Config, TrainingArguments

from starcoder2_train.configs import PretrainingArguments, RecipeError
from starcoder2_train.model.presets import MODEL_PRESETS
from starcoder2_train.training.loss import chunked_causal_lm_loss, disable_chunked_loss, enable_chunked_loss
from starcoder2_train.training.trainer import PretrainingTrainer

VOCAB = 96


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    config = Starcoder2Config(**{**MODEL_PRESETS["test"], "vocab_size": VOCAB})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    return model.train()


def batch(seed: int = 1, rows: int = 2, length: int = 40):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
    labels = input_ids.clone()
    labels[torch.rand(rows, length, generator=generator) < 0.2] = -100  # ignored positions inside rows
    labels[-1, -7:] = -100  # padding at the end of a row
    return {"input_ids": input_ids, "labels": labels}


def loss_and_gradients(model, inputs, **kwargs):
    model.zero_grad()
    loss = model(**inputs, **kwargs).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(expected, actual):
    (loss_a, grads_a), (loss_b, grads_b) = expected, actual
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_loss_equals_transformers_loss_and_gradients(chunk_size):
    model, inputs = tiny_model(), batch()
    expected = loss_and_gradients(model, inputs)
    enable_chunked_loss(model, chunk_size)
    assert_same(expected, loss_and_gradients(model, inputs))


def test_num_items_in_batch_divides_the_sum_as_transformers_does():
    model, inputs = tiny_model(), batch()
    expected = loss_and_gradients(model, inputs, num_items_in_batch=torch.tensor(123))
    enable_chunked_loss(model, 16)
    assert_same(expected, loss_and_gradients(model, inputs, num_items_in_batch=torch.tensor(123)))


def test_the_function_alone_matches_cross_entropy_of_full_logits():
    torch.manual_seed(0)
    hidden = torch.randn(2, 10, 8, requires_grad=True)
    head = torch.nn.Linear(8, 30, bias=True)
    labels = torch.randint(0, 30, (2, 10))
    labels[0, 3] = -100
    full = torch.nn.functional.cross_entropy(head(hidden)[:, :-1].reshape(-1, 30), labels[:, 1:].reshape(-1))
    chunked = chunked_causal_lm_loss(hidden, head, labels, chunk_size=3)
    torch.testing.assert_close(chunked, full)
    grad_full = torch.autograd.grad(full, hidden)[0]
    grad_chunked = torch.autograd.grad(chunked_causal_lm_loss(hidden, head, labels, chunk_size=3), hidden)[0]
    torch.testing.assert_close(grad_chunked, grad_full)


def test_logits_are_never_computed_for_more_than_one_chunk():
    model, inputs = tiny_model(), batch(rows=2, length=40)
    rows_seen = []
    model.lm_head.register_forward_hook(
        lambda module, args, output: rows_seen.append(output.reshape(-1, VOCAB).shape[0])
    )
    enable_chunked_loss(model, 16)
    loss_and_gradients(model, inputs)
    assert rows_seen and max(rows_seen) <= 16
    assert sum(rows_seen) == 2 * 80  # every position once forward and once in the backward's recomputation


def test_eval_mode_and_disable_give_the_original_forward():
    model, inputs = tiny_model(), batch()
    enable_chunked_loss(model, 8)
    model.eval()
    with torch.no_grad():
        output = model(**inputs)
    assert output.logits.shape == (2, 40, VOCAB) and output.loss is not None
    disable_chunked_loss(model)
    assert "forward" not in model.__dict__
    with pytest.raises(ValueError, match="loss_chunk_size"):
        enable_chunked_loss(model, 0)


def test_recipe_key_is_validated():
    with pytest.raises(RecipeError, match="loss_chunk_size"):
        PretrainingArguments(output_dir="unused", loss_chunk_size=-1, report_to="none")


def _train_losses(tmp_path, args_class, **extra):
    model = tiny_model(seed=3)
    rows = [{key: value[0] for key, value in batch(seed=s, rows=1).items()} for s in range(8)]
    args = args_class(
        output_dir=str(tmp_path / args_class.__name__),
        max_steps=4,
        per_device_train_batch_size=2,
        logging_steps=1,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        **extra,
    )
    trainer = PretrainingTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_the_trainer_trains_the_same_with_a_chunked_loss(tmp_path):
    plain = _train_losses(tmp_path, TrainingArguments)
    chunked = _train_losses(tmp_path, PretrainingArguments, loss_chunk_size=8, train_sampling_strategy="random")
    assert len(plain) == 4
    assert chunked == pytest.approx(plain, rel=1e-5)
