"""Window-level FIM (fim_level: window): every window undoes to the stream it read, examples stay apart, the path
line stays in the prefix, nothing is truncated, draws are fixed by (seed, epoch, window), and the real commands
report it."""

import pickle

import datasets
import numpy as np
import pytest
from conftest import load_script, random_repositories, write_repository_shards

from starcoder2_train.configs import DataArguments, RecipeError
from starcoder2_train.data.examples.fim import FimRates, WindowFim
from starcoder2_train.data.pipeline import build_packed_dataset, tokenize_repositories
from starcoder2_train.data.special_tokens import IGNORE_INDEX, SpecialTokenIds
from starcoder2_train.data.tokens.tokenizer import load_tokenizer
from starcoder2_train.data.windows.packing import PackedDataset


def plain_rows(tokenizer, repos, seed=0):
    """Token rows without FIM (what fim_level: window prepares), from real repositories."""
    args = DataArguments(dataset_name_or_path="unused", fim_rate=0.9, fim_fragment_rate=0.9, fim_level="window")
    table = datasets.Dataset.from_list([{"repo_name": r["repo_name"], "files": r["files"]} for r in repos])
    return tokenize_repositories(table, tokenizer, args, seed)


def undo(tokens, tokenizer, ids):
    """(text of the window with every FIM fragment put back in order, [(mode, prefix text)] of the fragments)."""
    structure = {ids.eos, ids.file_sep, ids.repo_name}
    out, fragments, run = [], [], []

    def flush():
        if not run:
            return
        if run[0] != ids.fim_prefix:
            out.append(tokenizer.decode(run))
        elif run[1] == ids.fim_suffix:  # SPM: <fim_prefix><fim_suffix>suffix<fim_middle>prefix middle
            middle_at = run.index(ids.fim_middle)
            suffix, rest = tokenizer.decode(run[2:middle_at]), tokenizer.decode(run[middle_at + 1 :])
            out.append(rest + suffix)
            fragments.append(("spm", rest))
        else:  # PSM: <fim_prefix>prefix<fim_suffix>suffix<fim_middle>middle
            suffix_at, middle_at = run.index(ids.fim_suffix), run.index(ids.fim_middle)
            prefix = tokenizer.decode(run[1:suffix_at])
            out.append(
                prefix + tokenizer.decode(run[middle_at + 1 :]) + tokenizer.decode(run[suffix_at + 1 : middle_at])
            )
            fragments.append(("psm", prefix))
        run.clear()

    for token in tokens.tolist():
        if token in structure:
            flush()
            out.append(f"<{token}>")
        else:
            run.append(token)
    flush()
    return "".join(out), fragments


@pytest.fixture(scope="module")
def rows(tokenizer):
    return plain_rows(tokenizer, random_repositories(60, seed=5, max_files=4))


def test_every_window_undoes_to_the_stream_tokens_it_read(tokenizer, rows):
    ids = SpecialTokenIds.from_tokenizer(tokenizer)
    seq = 96
    fim = WindowFim(tokenizer, FimRates(0.9, 0.9, 0.5), seed=0, epoch=0)
    packed = PackedDataset(rows, seq, ids, fim=fim)
    stream = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows["input_ids"]])
    assert packed.stride == seq - WindowFim.reserve(seq) and len(packed) == -(-len(stream) // packed.stride)
    modes = set()
    for index in range(len(packed)):
        tokens, _, counts = packed._window_tokens(index)
        read = stream[index * packed.stride : (index + 1) * packed.stride]
        assert len(tokens) <= seq
        text, fragments = undo(tokens, tokenizer, ids)
        assert text == undo(read, tokenizer, ids)[0], f"window {index} lost or moved text"
        assert len(fragments) == counts.psm + counts.spm
        modes.update(mode for mode, _ in fragments)
        window = packed[index]
        assert len(window["input_ids"]) == seq and (window["labels"][len(tokens) :] == IGNORE_INDEX).all()
        # An example that starts inside the window (after <|endoftext|>) restarts positions and is not a target.
        after_eos = [k for k in range(1, len(tokens)) if tokens[k - 1] == ids.eos]
        assert all(window["position_ids"][k] == 0 and window["labels"][k] == IGNORE_INDEX for k in after_eos)
    assert modes == {"psm", "spm"}


def test_the_path_line_stays_at_the_start_of_the_prefix(tokenizer):
    ids = SpecialTokenIds.from_tokenizer(tokenizer)
    repos = random_repositories(40, seed=8, max_files=3)
    args = DataArguments(dataset_name_or_path="unused", fim_level="window", repo_metadata_rate=1.0)
    table = datasets.Dataset.from_list([{"repo_name": r["repo_name"], "files": r["files"]} for r in repos])
    rows = tokenize_repositories(table, tokenizer, args, seed=0)
    paths = {f["path"] for r in repos for f in r["files"]}
    packed = PackedDataset(rows, 256, ids, fim=WindowFim(tokenizer, FimRates(1.0, 1.0, 0.0), seed=0, epoch=0))
    checked = 0
    for index in range(len(packed)):
        tokens = packed._window_tokens(index)[0]
        for at in np.flatnonzero(tokens == ids.fim_prefix):
            if at > 0 and tokens[at - 1] == ids.file_sep:  # a file that opens in this window (PSM: rate 0 of SPM)
                rest = tokens[at + 1 :].tolist()
                suffix_at = rest.index(ids.fim_suffix)
                middle_at = rest.index(ids.fim_middle)
                end = next((k for k in range(middle_at, len(rest)) if rest[k] in (ids.eos, ids.file_sep)), len(rest))
                prefix = tokenizer.decode(rest[:suffix_at])
                whole = prefix + tokenizer.decode(rest[middle_at + 1 : end] + rest[suffix_at + 1 : middle_at])
                if "\n" not in whole:  # the window ends inside the path line: no whole line to keep
                    continue
                path = whole.split("\n", 1)[0]
                assert path in paths and prefix.startswith(path + "\n"), prefix[:80]
                checked += 1
    assert checked > 10


def test_draws_depend_on_seed_epoch_and_window_only(tokenizer, rows):
    ids = SpecialTokenIds.from_tokenizer(tokenizer)

    def windows(epoch, shuffle_seed=None):
        fim = WindowFim(tokenizer, FimRates(0.5, 0.5, 0.5), seed=3, epoch=epoch)
        packed = PackedDataset(rows, 128, ids, fim=fim, shuffle_seed=shuffle_seed)
        return packed, {
            int(packed.order[i]) if packed.order else i: packed[i]["input_ids"].tolist() for i in range(len(packed))
        }

    packed, first = windows(0)
    _, shuffled = windows(0, shuffle_seed=7)
    assert first == shuffled  # the same window gets the same FIM whatever the order it is read in
    copy = pickle.loads(pickle.dumps(packed))  # what a data-loader worker receives
    assert [copy[i]["input_ids"].tolist() for i in range(len(copy))] == [first[i] for i in range(len(packed))]
    assert windows(1)[1] != first  # another epoch draws again


def test_a_window_too_full_for_its_sentinels_leaves_fragments_plain(tokenizer):
    """Many one-line files in a short window: more drawn fragments than room; the rest stay plain, counted."""
    ids = SpecialTokenIds.from_tokenizer(tokenizer)
    repos = [
        {
            "repo_name": f"r{n}",
            "files": [{"path": f"f{k}.py", "content": f"x{k} = {k}\n", "language": "Python"} for k in range(12)],
        }
        for n in range(6)
    ]
    rows = plain_rows(tokenizer, repos)
    packed = PackedDataset(rows, 64, ids, fim=WindowFim(tokenizer, FimRates(1.0, 1.0, 0.5), seed=0, epoch=0))
    counts = packed.sample_fim_counts(len(packed))
    assert counts.no_room > 0 and counts.psm + counts.spm > 0
    assert all(len(packed._window_tokens(i)[0]) <= 64 for i in range(len(packed)))


def test_a_character_cut_by_the_window_edge_is_left_plain(tokenizer):
    ids = SpecialTokenIds.from_tokenizer(tokenizer)
    content = "".join(f"s{k} = '{chr(0x1F600 + k % 40) * 3}'\n" for k in range(60))  # 4-byte characters, split
    rows = plain_rows(
        tokenizer, [{"repo_name": "emoji", "files": [{"path": "e.py", "content": content, "language": "Python"}]}]
    )
    packed = PackedDataset(rows, 48, ids, fim=WindowFim(tokenizer, FimRates(1.0, 1.0, 0.5), seed=0, epoch=0))
    stream = np.asarray(rows["input_ids"][0], dtype=np.int64)
    counts = packed.sample_fim_counts(len(packed))
    assert counts.split_character > 0 and counts.psm + counts.spm > 0
    for index in range(len(packed)):  # byte for byte, as the window read it (decode would hide a split character)
        tokens = packed._window_tokens(index)[0]
        if not (tokens == ids.fim_prefix).any():
            read = stream[index * packed.stride : (index + 1) * packed.stride]
            assert tokens.tolist() == read.tolist()


def test_the_real_commands_report_window_fim_and_refuse_file_fim_prepared_data(tmp_path, tokenizer_dir, capsys):
    """inspect_data.py and prepare_data.py with num_proc 2: the report counts the window FIM; a store prepared with
    file-level FIM is refused by name for fim_level: window; one prepared with fim_level: window trains."""
    shards = write_repository_shards(tmp_path / "shards", random_repositories(40, seed=9), num_files=2)
    words = ["--dataset_name_or_path", shards, "--tokenizer_name_or_path", tokenizer_dir, "--seq_length", "128"]
    words += ["--model_config", "test", "--num_proc", "2", "--output_dir", str(tmp_path / "o")]
    output = str(tmp_path / "samples.jsonl")
    load_script("inspect_data").main(
        ["recipes/tiny/pretrain.yaml", *words, "--fim_level", "window", "--output", output]
    )
    printed = capsys.readouterr().out
    assert "FIM per window (fim_level: window), in the first" in printed and "files FIM-transformed" not in printed
    prepare_data = load_script("prepare_data")
    prepare_data.main(
        [
            "recipes/tiny/pretrain.yaml",
            *words,
            "--fim_level",
            "file",
            "--output",
            str(tmp_path / "file"),
            "--disable_tqdm",
        ]
    )
    prepare_data.main(
        ["recipes/tiny/pretrain.yaml", *words, "--fim_level", "window", "--output", str(tmp_path / "window")]
        + ["--disable_tqdm"]
    )
    tokenizer = load_tokenizer(tokenizer_dir)

    def packed(prepared: str):
        args = DataArguments(prepared_data_dir=prepared, tokenizer_name_or_path=tokenizer_dir, seq_length=128)
        args.fim_level = "window"
        return build_packed_dataset(args, tokenizer, seed=42)

    with pytest.raises(RecipeError, match="fim_level: window .* holds file-level FIM already"):
        packed(str(tmp_path / "file"))
    dataset, report = packed(str(tmp_path / "window"))
    assert report.window_fim["psm"] + report.window_fim["spm"] > 0
    assert (dataset[0]["input_ids"] >= 0).all()
    with pytest.raises(RecipeError, match="fim_level: must be one of file, window"):
        DataArguments(dataset_name_or_path=shards, fim_level="document")
