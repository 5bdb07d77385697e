"""Pieces → token ids, with structure tokens by id and source text never parsed for special tokens.

Tokenizing the rendered string with special-token parsing on (what most pipelines do) lets a source
file that contains the text `<fim_middle>` or `<|endoftext|>` inject control tokens. Here each text
piece is encoded by the Rust tokenizer with `encode_special_tokens=True` (special tokens' text is
split like any other text), and structure tokens are inserted by their real ids. All text pieces of a
batch go through one `encode_batch_fast` call, so the overhead over raw tokenization stays small.

In every process. `tokenizers.Tokenizer` forgets `encode_special_tokens` when it is pickled, dill-pickled or
deep-copied (checked with tokenizers 0.23), and `datasets.map` pickles the function it runs, with num_proc 1
as with more. So a PieceTokenizer travels as the tokenizer's JSON and sets the flag again wherever it is
unpickled or copied, and `encode_texts` refuses to encode if the flag is off anyway.

`encode_arrays` is the bounded-memory form for the preparation (data/prepare.py): texts are encoded a batch of at
most ARRAY_BATCH_CHARACTERS characters at a time and each result becomes an int32 numpy array at once, so a
repository's tokens cost 4 bytes each (not a Python list's ~36: an 8-byte pointer and a 28-byte int), and the
tokenizer's own Encoding objects exist for one batch only.
"""

import numpy as np
from tokenizers import Tokenizer

from starcoder2_train.data.examples.repo_examples import Piece
from starcoder2_train.data.special_tokens import STARCODER2_SPECIAL_TOKENS, SpecialTokenIds

ARRAY_BATCH_CHARACTERS = 1 << 20  # text encoded at a time by encode_arrays: its Encodings are tens of MB


class PieceTokenizer:
    """Encodes lists of pieces; picklable (as JSON), so datasets can ship it to `num_proc` workers intact."""

    def __init__(self, tokenizer, name: str = "the tokenizer"):
        self.special = SpecialTokenIds.from_tokenizer(tokenizer, name)
        vocab = tokenizer.get_vocab()
        self.token_ids = {token: vocab[token] for token in STARCODER2_SPECIAL_TOKENS if token in vocab}
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self._use(Tokenizer.from_str(backend.to_str()))  # a copy of our own: the caller's keeps its settings
        self.check_no_injection(name)

    def _use(self, backend: Tokenizer) -> None:
        backend.encode_special_tokens = True
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend

    def __getstate__(self) -> dict:
        return {**self.__dict__, "backend": self.backend.to_str()}

    def __setstate__(self, state: dict) -> None:
        backend = Tokenizer.from_str(state.pop("backend"))
        self.__dict__.update(state)
        self._use(backend)

    def check_no_injection(self, name: str) -> None:
        """Refuse a tokenizer whose ordinary merges can spell a special token (it would leak control ids)."""
        literal = "".join(f" {token} x{token}\n" for token in self.token_ids)
        leaked = set(self.encode_texts([literal])[0]) & set(self.token_ids.values())
        if leaked:
            raise ValueError(
                f"tokenizer_name_or_path: {name} encodes the literal text of special tokens to their ids "
                f"{sorted(leaked)} even with special-token parsing off; retrain it with scripts/train_tokenizer.py."
            )

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        if not self.backend.encode_special_tokens:
            raise RuntimeError(
                "PieceTokenizer: special-token parsing is on in this process (the backend was replaced or copied "
                "outside PieceTokenizer); source text could inject control tokens, so nothing is encoded."
            )
        return [encoding.ids for encoding in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text as an int32 array; memory beyond the results: one batch of Encodings."""
        results, batch, size = [], [], 0
        for text in texts:
            if batch and size + len(text) > ARRAY_BATCH_CHARACTERS:
                results += [np.array(ids, dtype=np.int32) for ids in self.encode_texts(batch)]
                batch, size = [], 0
            batch.append(text)
            size += len(text)
        if batch:
            results += [np.array(ids, dtype=np.int32) for ids in self.encode_texts(batch)]
        return results

    def encode(self, examples: list[list[Piece]]) -> list[list[int]]:
        """Token ids of each example; source text and structure tokens never mix."""
        texts = [text for pieces in examples for is_token, text in pieces if not is_token and text]
        encoded = iter(self.encode_texts(texts))
        results = []
        for pieces in examples:
            ids = []
            for is_token, text in pieces:
                if is_token:
                    ids.append(self.token_ids[text])
                elif text:
                    ids += next(encoded)
            results.append(ids)
        return results
