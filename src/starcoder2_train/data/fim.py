"""StarCoder2's repository-context, file-level Fill-in-the-Middle.

A repository example is a FIM candidate with probability `fim_rate`; each file of a candidate is
then transformed with probability `fim_fragment_rate`. A transformed file is cut at two uniform
character positions in [0, len(code)] (sorted; any part may be empty) and written as

    PSM: <fim_prefix>prefix<fim_suffix>suffix<fim_middle>middle
    SPM: <fim_prefix><fim_suffix>suffix<fim_middle>prefix middle    (bigcode Megatron's variant)

chosen with probability `fim_spm_rate` for SPM. In SPM, prefix and middle are two texts, tokenized apart
and their ids concatenated (as bigcode's Megatron and Fast-LLM do), so that the boundary between them in
training is where an inference prompt `<fim_prefix><fim_suffix>suffix<fim_middle>prefix` ends. With
metadata, the file path and its newline belong to the prefix, so they are never cut. `<repo_name>name` is
never transformed. Every random choice comes from `example_rng(seed, epoch, repo_name, "fim")`.
"""

from dataclasses import dataclass

from starcoder2_train.data.repo_examples import Piece, RepoExample, example_rng
from starcoder2_train.data.special_tokens import EOS_TOKEN, FILE_SEP, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX


@dataclass(frozen=True)
class FimRates:
    fim_rate: float = 0.5
    fim_fragment_rate: float = 0.5
    fim_spm_rate: float = 0.5


@dataclass
class FimResult:
    pieces: list[Piece]
    num_psm: int
    num_spm: int


def fim_file(header: str, content: str, cut_a: int, cut_b: int, spm: bool) -> list[Piece]:
    """One file, FIM-transformed at character positions cut_a <= cut_b of `content`."""
    prefix, middle, suffix = header + content[:cut_a], content[cut_a:cut_b], content[cut_b:]
    if spm:
        return [
            (True, FIM_PREFIX),
            (True, FIM_SUFFIX),
            (False, suffix),
            (True, FIM_MIDDLE),
            (False, prefix),
            (False, middle),
        ]
    return [
        (True, FIM_PREFIX),
        (False, prefix),
        (True, FIM_SUFFIX),
        (False, suffix),
        (True, FIM_MIDDLE),
        (False, middle),
    ]


def apply_fim(example: RepoExample, rates: FimRates, seed: int, epoch: int) -> FimResult:
    """Render `example` as pieces, FIM-transforming files as StarCoder2 did."""
    rng = example_rng(seed, epoch, example.repo_name, "fim")
    candidate = rng.random() < rates.fim_rate
    pieces, num_psm, num_spm = example.head(), 0, 0
    for path, content in example.files:
        pieces.append((True, FILE_SEP))
        header = example.file_header(path)
        if candidate and rng.random() < rates.fim_fragment_rate:
            cut_a, cut_b = sorted((rng.randint(0, len(content)), rng.randint(0, len(content))))
            spm = rng.random() < rates.fim_spm_rate
            pieces += fim_file(header, content, cut_a, cut_b, spm)
            num_spm += spm
            num_psm += not spm
        else:
            pieces.append((False, header + content))
    pieces.append((True, EOS_TOKEN))
    return FimResult(pieces=pieces, num_psm=num_psm, num_spm=num_spm)
