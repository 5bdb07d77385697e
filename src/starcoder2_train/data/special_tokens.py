"""StarCoder2's special tokens, in the tokenizer's order, and the ids this project relies on.

The released StarCoder2 tokenizer puts these tokens first, so that `<|endoftext|>` is id 0,
`<fim_prefix>` id 1, and so on. Tokenizers trained by `scripts/train_tokenizer.py` keep that order.
"""

from dataclasses import dataclass

EOS_TOKEN = "<|endoftext|>"
FIM_PREFIX = "<fim_prefix>"
FIM_MIDDLE = "<fim_middle>"
FIM_SUFFIX = "<fim_suffix>"
FIM_PAD = "<fim_pad>"
REPO_NAME = "<repo_name>"
FILE_SEP = "<file_sep>"

STARCODER2_SPECIAL_TOKENS = [
    EOS_TOKEN,
    FIM_PREFIX,
    FIM_MIDDLE,
    FIM_SUFFIX,
    FIM_PAD,
    REPO_NAME,
    FILE_SEP,
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
    "<code_to_intermediate>",
    "<intermediate_to_code>",
    "<pr>",
    "<pr_status>",
    "<pr_is_merged>",
    "<pr_base>",
    "<pr_file>",
    "<pr_base_code>",
    "<pr_diff>",
    "<pr_diff_hunk>",
    "<pr_comment>",
    "<pr_event_id>",
    "<pr_review>",
    "<pr_review_state>",
    "<pr_review_comment>",
    "<pr_in_reply_to_review_id>",
    "<pr_in_reply_to_comment_id>",
    "<pr_diff_hunk_comment_line>",
]

# The label of a position that is not trained on (padding, `<fim_pad>`, an example's first token): the
# `ignore_index` of PyTorch's cross-entropy and of transformers' losses. Every module takes it from here.
IGNORE_INDEX = -100

# The tokens the data pipeline writes; a tokenizer without any of them cannot train this format.
REQUIRED_TOKENS = (EOS_TOKEN, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, REPO_NAME, FILE_SEP)


@dataclass(frozen=True)
class SpecialTokenIds:
    """The ids of the structure tokens, read from a real tokenizer (never assumed)."""

    eos: int
    fim_prefix: int
    fim_middle: int
    fim_suffix: int
    fim_pad: int
    repo_name: int
    file_sep: int

    @classmethod
    def from_tokenizer(cls, tokenizer, name: str = "the tokenizer") -> "SpecialTokenIds":
        """Look the structure tokens up in `tokenizer` (a transformers or a `tokenizers` tokenizer).

        Raises ValueError naming the tokenizer and every missing token, so that a tokenizer without
        FIM tokens is refused before any work instead of silently training on unknown ids.
        """
        vocab = tokenizer.get_vocab()
        missing = [token for token in REQUIRED_TOKENS if token not in vocab]
        if missing:
            raise ValueError(
                f"tokenizer_name_or_path: {name} lacks the special token(s) {', '.join(missing)} that "
                "StarCoder2's repository and FIM format needs. Use the StarCoder2 tokenizer "
                "(bigcode/starcoder2-3b) or train one with scripts/train_tokenizer.py."
            )
        ids = [vocab[token] for token in REQUIRED_TOKENS]
        return cls(*ids)

    def as_set(self) -> frozenset:
        return frozenset(
            (self.eos, self.fim_prefix, self.fim_middle, self.fim_suffix, self.fim_pad, self.repo_name, self.file_sep)
        )
