"""FIM on real token ids: round trip, rates, repository name untouched, determinism."""

import math

import pytest
from conftest import random_repositories
from fim_utils import undo_example

from starcoder2_train.data.examples.fim import FimRates, apply_fim
from starcoder2_train.data.examples.repo_examples import build_example
from starcoder2_train.data.special_tokens import SpecialTokenIds
from starcoder2_train.data.tokens.tokenization import PieceTokenizer


def encode_repos(repos, tokenizer, rates, seed=0, epoch=0, metadata_rate=0.5):
    pieces, results, examples = [], [], []
    for repo in repos:
        example = build_example(repo["repo_name"], repo["files"], seed, epoch, metadata_rate)
        result = apply_fim(example, rates, seed, epoch)
        examples.append(example)
        results.append(result)
        pieces.append(result.pieces)
    return examples, results, PieceTokenizer(tokenizer).encode(pieces)


def test_round_trip_restores_every_file_exactly(tokenizer):
    repos = random_repositories(300, seed=1)
    examples, results, ids = encode_repos(repos, tokenizer, FimRates(0.8, 0.8, 0.5))
    ids_of = SpecialTokenIds.from_tokenizer(tokenizer)
    seen_modes = set()
    for example, result, example_ids in zip(examples, results, ids):
        repo_name, files, modes = undo_example(example_ids, tokenizer, ids_of)
        assert repo_name == (example.repo_name if example.with_metadata else None)
        assert files == [example.file_header(p) + c for p, c in example.files]
        # PSM with an empty prefix is written exactly like SPM, so only the total is recoverable.
        assert modes.count("psm") + modes.count("spm") == result.num_psm + result.num_spm
        assert modes.count("psm") <= result.num_psm
        seen_modes.update(modes)
    assert seen_modes == {"plain", "psm", "spm"}


def test_file_path_stays_in_the_prefix(tokenizer):
    repo = {"repo_name": "o/r", "files": [{"path": "pkg/mod.py", "content": "x = 1\ny = 2\n", "language": "Python"}]}
    for seed in range(40):
        example = build_example(repo["repo_name"], repo["files"], seed, 0, 1.0)
        pieces = apply_fim(example, FimRates(1.0, 1.0, 0.5), seed, 0).pieces
        texts = [text for is_token, text in pieces if not is_token]
        prefix_piece = next(t for t in texts if t.startswith("pkg/mod.py\n"))
        assert "pkg/mod.py" not in "".join(t for t in texts if t is not prefix_piece)


def binomial_ok(successes: int, trials: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(successes - trials * p) <= sigmas * math.sqrt(trials * p * (1 - p)) + 1


@pytest.mark.parametrize("rates", [FimRates(0.5, 0.5, 0.5), FimRates(0.9, 0.3, 0.2)])
def test_fim_and_spm_shares_match_the_settings(rates):
    repos = random_repositories(3000, seed=2, max_files=4)
    files = psm = spm = candidates = 0
    for repo in repos:
        example = build_example(repo["repo_name"], repo["files"], 7, 0, 0.5)
        result = apply_fim(example, rates, 7, 0)
        files += len(example.files)
        psm, spm = psm + result.num_psm, spm + result.num_spm
        candidates += (result.num_psm + result.num_spm) > 0
    assert binomial_ok(psm + spm, files, rates.fim_rate * rates.fim_fragment_rate)
    assert binomial_ok(spm, psm + spm, rates.fim_spm_rate)


def test_repository_name_is_never_inside_a_fim_span(tokenizer):
    repos = random_repositories(200, seed=3)
    _, _, ids = encode_repos(repos, tokenizer, FimRates(1.0, 1.0, 0.5), metadata_rate=1.0)
    ids_of = SpecialTokenIds.from_tokenizer(tokenizer)
    for repo, example_ids in zip(repos, ids):
        assert example_ids[0] == ids_of.repo_name
        first_file = example_ids.index(ids_of.file_sep)
        assert tokenizer.decode(example_ids[1:first_file]) == repo["repo_name"]
        assert ids_of.fim_prefix not in example_ids[:first_file]


def test_choices_depend_on_seed_epoch_and_repository_only():
    repos = random_repositories(50, seed=4)
    rates = FimRates()

    def render(order, seed=0, epoch=0):
        return {
            r["repo_name"]: apply_fim(
                build_example(r["repo_name"], r["files"], seed, epoch, 0.5), rates, seed, epoch
            ).pieces
            for r in order
        }

    forward = render(repos)
    assert forward == render(list(reversed(repos)))
    assert forward != render(repos, epoch=1)
    assert forward != render(repos, seed=1)


def test_file_order_does_not_depend_on_the_order_of_the_shard():
    files = [{"path": f"f{i}.py", "content": f"x = {i}\n"} for i in range(8)]
    for seed in range(5):
        forward = build_example("o/r", files, seed, 0, 0.5)
        assert build_example("o/r", list(reversed(files)), seed, 0, 0.5) == forward


def test_spm_tokenizes_prefix_and_middle_apart(tokenizer):
    rates, pieces = FimRates(1.0, 1.0, 1.0), PieceTokenizer(tokenizer)
    content = "def add(a, b):\n    return a + b\n"
    example = build_example("o/r", [{"path": "a.py", "content": content}], 0, 0, 0.0)
    result = apply_fim(example, rates, 0, 0)
    texts = [text for is_token, text in result.pieces if not is_token]
    suffix, prefix, middle = texts
    assert result.num_spm == 1 and prefix + middle + suffix == content
    ids = pieces.encode([result.pieces])[0]
    special = pieces.special
    after_middle = ids[ids.index(special.fim_middle) + 1 : -1]  # up to <|endoftext|>
    assert after_middle == pieces.encode_texts([prefix])[0] + pieces.encode_texts([middle])[0]
