"""A mixture prepared by prepare_data.py: a repository source and a document source (data/sources/document_reader.py,
data/prepare_pieces.py's documents as records of 0 files), then trained on by run_pretrain.py with 2 processes."""

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import LAUNCH_ENV, load_script
from test_mixture import documents_dir, write_mixture_recipe  # noqa: F401 (documents_dir: a fixture)

from starcoder2_train.configs import DataArguments, RecipeError
from starcoder2_train.data.pipeline import build_training_data, load_token_rows
from starcoder2_train.data.store.pieces import PieceStore
from starcoder2_train.data.store.prepared import pieces_directory, prepared_stats, stored_once
from starcoder2_train.data.windows.assembly import EpochStream
from starcoder2_train.data.windows.mixture import MixtureSchedule

ROOT = Path(__file__).parents[1]
prepare_data = load_script("prepare_data")
RUN_KEYS = dict(  # what the 2-process run needs; the preparation reads the same recipe
    torch_dtype="float32",
    attn_implementation="sdpa",
    logging_steps=5,
    save_strategy="'no'",
    eval_strategy="'no'",
    bf16="false",
    disable_tqdm="true",
    fim_level="window",
    eval_fraction=0.1,
)


@pytest.fixture(scope="module")
def prepared_mixture(tmp_path_factory, code_shards, documents_dir, tokenizer_dir):  # noqa: F811
    """(recipe, output): the mixture prepared with --tasks 2, and what the command printed."""
    root = tmp_path_factory.mktemp("prepared_mixture")
    recipe = write_mixture_recipe(
        root / "mix.yaml", code_shards, documents_dir, tokenizer_dir, output_dir=root / "out", **RUN_KEYS
    )
    output = root / "prepared"
    prepare_data.main([str(recipe), "--output", str(output), "--tasks", "2", "--workers", "2", "--disable_tqdm"])
    return recipe, output


def test_a_document_source_prepares_as_its_in_process_documents(prepared_mixture, documents_dir, tokenizer):  # noqa: F811
    """Each document a record of 0 files holding its content, `<issue_start>` (declared) its id, the literal
    `<file_sep>` and `<|endoftext|>` text; the documents are the in-process path's token rows, in another order."""
    _, output = prepared_mixture
    assert stored_once(str(output / "mine")) and stored_once(str(output / "stack"))
    pieces = PieceStore(pieces_directory(str(output / "mine"), "train"))
    assert pieces.num_records == 40 and len(pieces.tokens.names) == 2  # two tasks, every document train
    assert all((pieces.table(p)["num_files"] == 0).all() for p in range(2))
    assert PieceStore(pieces_directory(str(output / "mine"), "eval")).num_records == 0  # no held-out split
    stream = EpochStream(pieces, 0, seed=3, repo_metadata_rate=0.5)
    prepared = sorted(stream.example(i).tolist() for i in range(40))
    source = DataArguments(
        dataset_name_or_path=documents_dir, dataset_kind="documents", structure_tokens=["<issue_start>"]
    )
    rows, _ = load_token_rows(source, tokenizer, seed=3)
    assert prepared == sorted(np.asarray(ids).tolist() for ids in rows["input_ids"])
    ids = np.concatenate([np.asarray(example) for example in prepared])
    vocab = tokenizer.get_vocab()
    assert (ids == vocab["<issue_start>"]).sum() == 40 * 3 and (ids == vocab["<issue_comment>"]).sum() == 0
    assert (ids == vocab["<file_sep>"]).sum() == 0 and (ids == vocab["<|endoftext|>"]).sum() == 40
    assert tokenizer.decode(prepared[0]).count("<file_sep>") == 3  # the text, kept as text
    assert prepared_stats(str(output / "mine"))["train files"] == 40


def test_a_document_source_of_kind_auto_at_file_level_fim_is_refused(documents_dir, tokenizer_dir):  # noqa: F811
    from starcoder2_train.data.prepare import build_stages

    data = DataArguments(dataset_name_or_path=documents_dir, tokenizer_name_or_path=tokenizer_dir, fim_level="file")
    with pytest.raises(RecipeError, match="dataset_kind: auto, and .* holds documents"):
        build_stages(data, "/nonexistent", 0, 1, 100)
    data.dataset_kind = "documents"  # stored once, no FIM, whatever the level
    assert [name for name, *_ in build_stages(data, "/nonexistent", 0, 1, 100)] == ["tokens"]


@pytest.mark.slow
def test_two_processes_train_on_the_prepared_mixture(prepared_mixture, tokenizer, tmp_path):
    """run_pretrain.py, 2 processes under ZeRO-2, on --prepared_data_dir: each source's manifest checked, the
    windows drawn from the sources as the weights' schedule says, and the windows of each source those of its
    store (the same MixtureDataset in process)."""
    pytest.importorskip("deepspeed")
    recipe, output = prepared_mixture
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += ["accelerate_configs/deepspeed_zero2.yaml", "--num_processes", "2", "--main_process_port", "0"]
    command += ["scripts/run_pretrain.py", str(recipe), "--prepared_data_dir", str(output)]
    command += ["--max_steps", "6", "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=ROOT, env=LAUNCH_ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and all(np.isfinite(e["loss"]) for e in state["log_history"] if "loss" in e)
    total = 6 * 2 * 2  # steps x per-device batch x processes
    read = MixtureSchedule([0.8, 0.2], seed=3).windows_read(total)
    printed = result.stdout + result.stderr
    assert f"stack (repositories): weight 0.8000, share {read[0] / total:.4f} ({read[0]:,} windows" in printed
    assert f"mine (documents): weight 0.2000, share {read[1] / total:.4f} ({read[1]:,} windows" in printed
    # The windows that run read, in process: source by the schedule, each the window of its source's store.
    from starcoder2_train.recipe import RecipeParser

    _, data, _ = RecipeParser().parse([str(recipe), "--prepared_data_dir", str(output)])
    training = types.SimpleNamespace(seed=3, max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                                     world_size=2, process_index=0, num_train_epochs=1)  # fmt: skip
    dataset, _ = build_training_data(data, tokenizer, training)
    sources = MixtureSchedule([0.8, 0.2], seed=3).sources_of(np.arange(total))
    assert [dataset.source_of(i) for i in range(total)] == [["stack", "mine"][s] for s in sources]
    file_sep = tokenizer.convert_tokens_to_ids("<file_sep>")
    for i in range(total):
        window = dataset[i]["input_ids"]
        assert (dataset.source_of(i) == "mine") <= (file_sep not in window.tolist())  # documents: text only
