"""Source text can never become a control token."""

import pytest
from transformers import PreTrainedTokenizerFast

from starcoder2_train.data.examples.fim import FimRates, apply_fim
from starcoder2_train.data.examples.repo_examples import build_example
from starcoder2_train.data.special_tokens import STARCODER2_SPECIAL_TOKENS, SpecialTokenIds
from starcoder2_train.data.tokens.tokenization import PieceTokenizer


def test_special_token_text_in_source_yields_no_special_ids(tokenizer):
    hostile = "".join(f"x = '{token}'\n{token}{token} # {token}\n" for token in STARCODER2_SPECIAL_TOKENS)
    repo = [{"path": f"{STARCODER2_SPECIAL_TOKENS[5]}/evil.py", "content": hostile, "language": "Python"}]
    vocab = tokenizer.get_vocab()
    special_ids = {vocab[token] for token in STARCODER2_SPECIAL_TOKENS}
    piece_tokenizer = PieceTokenizer(tokenizer)
    for seed in range(30):
        example = build_example("<|endoftext|>/<fim_middle>", repo, seed, 0, 0.5)
        result = apply_fim(example, FimRates(1.0, 1.0, 0.5), seed, 0)
        ids = piece_tokenizer.encode([result.pieces])[0]
        structure = [vocab[text] for is_token, text in result.pieces if is_token]
        assert [i for i in ids if i in special_ids] == structure
        text_only = [i for i in ids if i not in special_ids]
        assert len(text_only) > len(hostile) // 10


def test_tokenizer_without_fim_tokens_is_refused(tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_special_tokens(["<|endoftext|>", "<file_sep>"])
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    with pytest.raises(ValueError, match=r"tokenizer_name_or_path: my-tok lacks .*<fim_prefix>"):
        PieceTokenizer(plain, "my-tok")
    assert SpecialTokenIds.from_tokenizer(tokenizer).eos == tokenizer.get_vocab()["<|endoftext|>"]
