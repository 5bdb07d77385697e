"""Packing: nothing lost, labels and positions right, and packed examples isolated in a real model."""

import random

import datasets
import numpy as np
import pytest
import torch
from transformers import Starcoder2Config, Starcoder2ForCausalLM

from starcoder2_train.data.batches.collators import PackedCollator
from starcoder2_train.data.special_tokens import IGNORE_INDEX, SpecialTokenIds
from starcoder2_train.data.windows.packing import PackedDataset

SPECIAL = SpecialTokenIds(eos=0, fim_prefix=1, fim_middle=2, fim_suffix=3, fim_pad=4, repo_name=5, file_sep=6)


def token_rows(lengths, seed=0, vocab=100):
    rng = random.Random(seed)
    rows = [[rng.randrange(7, vocab) for _ in range(n - 1)] + [SPECIAL.eos] for n in lengths]
    return datasets.Dataset.from_dict({"input_ids": rows}), rows


def test_every_token_appears_in_order_even_beyond_three_windows():
    seq = 32
    dataset, rows = token_rows([5, 1, 40, 3 * seq + 7, 2, 31, 32, 33, 9])
    packed = PackedDataset(dataset, seq, SPECIAL)
    windows = [packed[i] for i in range(len(packed))]
    assert all(len(w["input_ids"]) == seq for w in windows)
    stream = np.concatenate([w["input_ids"] for w in windows])
    real = sum(len(r) for r in rows)
    assert stream[:real].tolist() == [t for r in rows for t in r]
    assert len(packed) == -(-real // seq) and packed.padding_tokens == len(packed) * seq - real
    assert packed.efficiency == pytest.approx(real / (len(packed) * seq))
    assert (windows[-1]["labels"][seq - packed.padding_tokens :] == IGNORE_INDEX).all()


def test_positions_restart_per_example_and_boundaries_are_not_targets():
    seq = 16
    dataset, rows = token_rows([4, 6, 20])  # the third example starts at 10 and continues into window 1
    packed = PackedDataset(dataset, seq, SPECIAL)
    first, second = packed[0], packed[1]
    assert first["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]
    assert first["labels"][[4, 10]].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    assert first["labels"][0] == rows[0][0] and first["labels"][5] == rows[1][1]
    assert second["position_ids"][:14].tolist() == list(range(14))  # continuation, then padding from 0
    assert second["position_ids"][14:].tolist() == [0, 1]
    assert second["labels"][14:].tolist() == [IGNORE_INDEX] * 2


def test_fim_pad_is_never_a_target_and_cross_document_mode_is_plain():
    dataset = datasets.Dataset.from_dict({"input_ids": [[9, SPECIAL.fim_pad, 8, 0], [7, 7, 0]]})
    window = PackedDataset(dataset, 8, SPECIAL, cross_document_attention=True)[0]
    assert window["labels"].tolist() == [9, IGNORE_INDEX, 8, 0, 7, 7, 0, IGNORE_INDEX]
    assert window["position_ids"].tolist() == list(range(8))


def test_shuffled_windows_are_a_permutation_and_collator_flattens():
    dataset, _ = token_rows([30] * 10)
    plain, shuffled = PackedDataset(dataset, 16, SPECIAL), PackedDataset(dataset, 16, SPECIAL, shuffle_seed=3)
    as_tuples = lambda d: sorted(tuple(d[i]["input_ids"]) for i in range(len(d)))  # noqa: E731
    assert as_tuples(plain) == as_tuples(shuffled)
    assert [tuple(plain[i]["input_ids"]) for i in range(len(plain))] != [
        tuple(shuffled[i]["input_ids"]) for i in range(len(plain))
    ]
    batch = PackedCollator(flatten=True)([plain[0], plain[1]])
    assert batch["input_ids"].shape == (1, 32) and "attention_mask" not in batch
    # The second window's first token is not a target of the first window's last token.
    assert batch["labels"][0, 16] == IGNORE_INDEX and plain[1]["labels"][0] != IGNORE_INDEX
    assert batch["labels"][0, 1:16].tolist() == plain[0]["labels"][1:].tolist()
    assert PackedCollator()([plain[0], plain[1]])["position_ids"].shape == (2, 16)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_logits_equal_each_example_alone(attn):
    torch.manual_seed(0)
    config = Starcoder2Config(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=12,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    model = Starcoder2ForCausalLM(config).eval()
    model.config._attn_implementation = attn
    lengths = [7, 20, 1, 30, 6]  # 20 and 30 exceed the 12-token sliding window
    dataset, rows = token_rows(lengths, seed=5)
    packed = PackedDataset(dataset, sum(lengths), SPECIAL)
    window = PackedCollator()([packed[0]])
    with torch.no_grad():
        logits = model(input_ids=window["input_ids"], position_ids=window["position_ids"], use_cache=False).logits[0]
        start = 0
        for row in rows:
            alone = model(input_ids=torch.tensor([row]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[start : start + len(row)], alone, atol=1e-5, rtol=1e-5)
            start += len(row)
        # Control: without restarting positions the examples do see each other.
        plain = model(input_ids=window["input_ids"], use_cache=False).logits[0]
        assert not torch.allclose(plain[7:27], model(input_ids=torch.tensor([rows[1]])).logits[0], atol=1e-3)


def test_a_token_store_packs_as_its_token_rows_shuffled_or_not(tmp_path):
    from starcoder2_train.data.store.token_store import TokenStore
    from starcoder2_train.data.store.token_writer import write_token_rows
    from starcoder2_train.data.windows.permutation import Permutation

    dataset, _ = token_rows([5, 1, 40, 3 * 16 + 7, 2, 31, 32, 33, 9, 17])
    write_token_rows(dataset, tmp_path, "part-00000", vocab_size=100)
    as_bytes = lambda window: tuple(window[key].tobytes() for key in ("input_ids", "labels", "position_ids"))  # noqa: E731
    for seed in (None, 0, 7):
        from_rows = PackedDataset(dataset, 16, SPECIAL, shuffle_seed=seed)
        from_store = PackedDataset(TokenStore(tmp_path), 16, SPECIAL, shuffle_seed=seed)
        assert [as_bytes(from_rows[i]) for i in range(len(from_rows))] == [
            as_bytes(from_store[i]) for i in range(len(from_store))
        ]
    plain, shuffled = PackedDataset(tmp_path, 16, SPECIAL), PackedDataset(tmp_path, 16, SPECIAL, shuffle_seed=7)
    order = Permutation(len(plain), 7)  # the window order: computed per index, nothing of size len(plain) held
    assert all(as_bytes(shuffled[i]) == as_bytes(plain[order[i]]) for i in range(len(plain)))
