"""dataset_mixture: sources drawn by weight (data/windows/mixture.py), document sources (data/sources/documents.py),
the entries' checks (configs/data_sources.py), and the mixture through inspect_data and a 2-process training run."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import LAUNCH_ENV, load_script, random_repositories, write_repository_shards

from starcoder2_train.configs import DataArguments, RecipeError
from starcoder2_train.data.pipeline import build_packed_dataset, build_training_data
from starcoder2_train.data.sources.documents import check_document_file, document_files, document_pieces
from starcoder2_train.data.windows.mixture import BLOCK, MixtureDataset, MixtureSchedule

ROOT = Path(__file__).parents[1]


def training_args(max_steps=40, batch=2, seed=1, **more):
    values = dict(seed=seed, max_steps=max_steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1)
    return types.SimpleNamespace(world_size=1, process_index=0, num_train_epochs=1, **values, **more)


def args(tokenizer_dir, **values):
    return DataArguments(tokenizer_name_or_path=tokenizer_dir, seq_length=64, **values)


@pytest.fixture(scope="module")
def documents_dir(tmp_path_factory):
    """A JSONL document table: issue-like text with StarCoder2 token spellings in it."""
    root = tmp_path_factory.mktemp("documents")
    with open(root / "issues.jsonl", "w") as handle:
        for i in range(40):
            text = f"<issue_start>title {i}\nthe text <file_sep> and <|endoftext|> stay text<issue_comment>reply {i}\n"
            handle.write(json.dumps({"content": text * 3}) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def second_shards(tmp_path_factory):
    return write_repository_shards(tmp_path_factory.mktemp("second"), random_repositories(40, seed=5), num_files=1)


# The schedule.


@pytest.mark.parametrize("weights", [[0.6, 0.3, 0.1], [0.2, 0.8], [0.97, 0.02, 0.01]])
def test_realised_shares_within_one_percent_of_the_weights(weights):
    schedule = MixtureSchedule(weights, seed=7)
    sources = schedule.sources_of(np.arange(3 * BLOCK + 12_345))
    shares = np.bincount(sources, minlength=len(weights)) / len(sources)
    assert np.allclose(shares, weights, atol=0.01), shares
    assert schedule.windows_read(len(sources)) == np.bincount(sources).tolist()


def test_each_source_window_is_read_once_and_the_extent_is_exact():
    schedule = MixtureSchedule([0.5, 0.3, 0.2], seed=2, block=1000)  # a small block: several blocks, a partial one
    located = [schedule.locate(i) for i in range(4321)]
    for source in range(3):
        windows = [k for s, k in located if s == source]
        assert len(windows) == len(set(windows)) == schedule.windows_read(4321)[source]
        assert max(windows) + 1 == schedule.windows_extent(4321)[source]
    assert [schedule.locate(i) for i in range(4321)] == located  # a function of (seed, i) alone
    assert [MixtureSchedule([0.5, 0.3, 0.2], seed=3, block=1000).locate(i) for i in range(50)] != located[:50]


class Tagged(torch.utils.data.Dataset):
    """Window k of source s is the tensor [s, k] (picklable, for loader workers)."""

    def __init__(self, source: int, length: int):
        self.source, self.length = source, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        return {"input_ids": torch.tensor([self.source, index])}


def rank_windows(dataset, ranks: int, rank: int, workers: int, batch: int = 4) -> list[tuple[int, int, int]]:
    """(global index, source, source window) of what `rank` reads, as the Trainer reads it: a sequential sampler
    in batches, sharded across ranks by accelerate's BatchSamplerShard (the sampler a prepared loader uses)."""
    from accelerate.data_loader import BatchSamplerShard

    batches = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(dataset), batch, drop_last=False)
    shard = BatchSamplerShard(batches, num_processes=ranks, process_index=rank, even_batches=False)
    indices = [index for indices in shard for index in indices]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=shard, num_workers=workers)
    rows = [row.tolist() for batch in loader for row in batch["input_ids"]]
    return [(index, *row) for index, row in zip(indices, rows)]


@pytest.fixture(scope="module")
def tagged_mixture():
    weights, total = [0.6, 0.3, 0.1], 3000
    schedule = MixtureSchedule(weights, seed=11, block=1024)
    extents = schedule.windows_extent(total)
    sources = [Tagged(s, extent) for s, extent in enumerate(extents)]
    return MixtureDataset(sources, ["a", "b", "c"], schedule, total)


@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_the_same_windows_whatever_the_ranks_and_loader_workers(tagged_mixture, ranks, workers):
    expected = [(i, *tagged_mixture[i]["input_ids"].tolist()) for i in range(len(tagged_mixture))]
    per_rank = [rank_windows(tagged_mixture, ranks, rank, workers) for rank in range(ranks)]
    seen = [index for windows in per_rank for index, _, _ in windows]
    assert len(seen) == len(set(seen)) == len(tagged_mixture)  # each rank's windows disjoint, none missed
    assert sorted(window for windows in per_rank for window in windows) == expected


# Entries and sources.


def test_one_source_is_a_mixture_of_one_and_reads_todays_windows(code_shards, tokenizer_dir, tokenizer):
    alone = args(tokenizer_dir, dataset_name_or_path=code_shards)
    listed = args(tokenizer_dir, dataset_mixture=[{"dataset_name_or_path": code_shards, "weight": 3}])
    assert [(s.name, s.weight, s.kind) for s in listed.sources()] == [
        (os.path.basename(code_shards), 1.0, "repositories")
    ]
    today, _ = build_packed_dataset(alone, tokenizer, seed=1)
    for steps in (10, 400):  # inside epoch 0, and past it (epoch 1 made on demand)
        one, _ = build_training_data(alone, tokenizer, training_args(max_steps=steps))
        mixture, report = build_training_data(listed, tokenizer, training_args(max_steps=steps))
        assert not report.mixture and len(one) == len(mixture)
        assert all(np.array_equal(one[i]["input_ids"], mixture[i]["input_ids"]) for i in range(len(one)))
        first = min(len(one), len(today))
        assert all(np.array_equal(one[i]["input_ids"], today[i]["input_ids"]) for i in range(first))


def test_per_source_overrides_apply_to_that_source_only(code_shards, second_shards, tokenizer_dir, tokenizer):
    data = args(
        tokenizer_dir,
        fim_rate=1.0,
        fim_fragment_rate=1.0,
        dataset_mixture=[
            {"dataset_name_or_path": code_shards, "weight": 1, "name": "fim"},
            {"dataset_name_or_path": second_shards, "weight": 1, "name": "plain", "fim_rate": 0.0, "languages": ["C"]},
        ],
    )
    fim, plain = data.sources()
    assert (fim.data_args.fim_rate, plain.data_args.fim_rate) == (1.0, 0.0)
    assert (fim.data_args.languages, plain.data_args.languages) == (None, ["C"])
    dataset, report = build_training_data(data, tokenizer, training_args(max_steps=50))
    fim_prefix = tokenizer.convert_tokens_to_ids("<fim_prefix>")
    by_source = {"fim": 0, "plain": 0}
    for index in range(len(dataset)):
        by_source[dataset.source_of(index)] += int(fim_prefix in dataset[index]["input_ids"])
    assert by_source["fim"] > 0 and by_source["plain"] == 0
    assert report.sources["plain"]["files_fim_psm"] == 0 and "language not in languages" in str(report.sources)


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"dataset_name_or_path": "a/b", "weight": 1, "fim_rat": 0.1}, "'fim_rat'. Did you mean 'fim_rate'?"),
        ({"dataset_name_or_path": "a/b", "weight": 0}, "weight: must be a positive number"),
        ({"dataset_name_or_path": "a/b", "weight": "lots"}, "weight: must be a positive number"),
        ({"dataset_name_or_path": "a/b", "weight": 1, "seq_length": 128}, "seq_length is not per source"),
        ({"dataset_name_or_path": "a/b", "weight": 1, "fim_rate": 2}, "(b): fim_rate: must be a probability"),
        ({"weight": 1}, "dataset_name_or_path: not set"),
        ({"dataset_name_or_path": "a/b", "weight": 1, "name": "x/y"}, "name: 'x/y' must be"),
        ("not a mapping", "is not a mapping"),
    ],
)
def test_bad_entries_are_refused_naming_the_entry_and_key(entry, message):
    with pytest.raises(RecipeError, match="dataset_mixture\\[1\\]") as error:
        DataArguments(dataset_mixture=[{"dataset_name_or_path": "c/d", "weight": 1}, entry])
    assert message in str(error.value)


def test_duplicate_names_and_both_data_keys_are_refused():
    with pytest.raises(RecipeError, match="name 'd' is also entry 0's"):
        DataArguments(
            dataset_mixture=[
                {"dataset_name_or_path": "c/d", "weight": 1},
                {"dataset_name_or_path": "e/d", "weight": 1},
            ]
        )
    with pytest.raises(RecipeError, match="dataset_name_or_path: set together with dataset_mixture"):
        DataArguments(dataset_name_or_path="c/d", dataset_mixture=[{"dataset_name_or_path": "c/d", "weight": 1}])


def test_prepared_stores_lie_under_the_source_names():
    data = DataArguments(
        prepared_data_dir="/data/prepared",
        dataset_mixture=[
            {"dataset_name_or_path": "o/stack", "weight": 0.8},
            {"dataset_name_or_path": "o/mine", "weight": 0.2, "prepared_data_dir": "/elsewhere"},
        ],
    )
    assert [s.data_args.prepared_data_dir for s in data.sources()] == ["/data/prepared/stack", "/elsewhere"]
    assert DataArguments(prepared_data_dir="/p").sources()[0].data_args.prepared_data_dir == "/p"


def test_the_starcoder2_recipes_name_their_mixture_and_the_command_line_can_replace_it():
    from starcoder2_train.recipe import RecipeParser

    recipe = str(ROOT / "recipes/starcoder2-3b/pretrain.yaml")
    _, data, _ = RecipeParser().parse([recipe, "--dry_run", "true"])
    sources = {source.name: source for source in data.sources()}
    assert sources["stack"].kind == "repositories" and sources["stack"].weight == pytest.approx(525.5 / 643.71)
    assert sources["issues"].kind == "documents" and "<issue_start>" in sources["issues"].data_args.structure_tokens
    assert sources["issues"].data_args.data_dir == "issues" and sum(
        s.weight for s in sources.values()
    ) == pytest.approx(1)
    _, one, _ = RecipeParser().parse([recipe, "--dry_run", "true", "--dataset_name_or_path", "data/mine"])
    assert one.dataset_mixture is None and [s.name for s in one.sources()] == ["mine"]


# Document sources.


def test_document_tables_recognised_by_schema(tmp_path, code_shards, documents_dir):
    pq.write_table(pa.table({"content": ["a", "b"], "id": ["1", "2"]}), tmp_path / "docs.parquet")
    kinds = [
        DataArguments(dataset_name_or_path=p).sources()[0].kind for p in (str(tmp_path), code_shards, documents_dir)
    ]
    assert kinds == ["documents", "repositories", "documents"]
    assert DataArguments(dataset_name_or_path=code_shards, dataset_kind="documents").sources()[0].kind == "documents"


def test_json_records_beside_the_shards_do_not_make_a_folder_documents(tmp_path):
    """scripts/ingest.py writes ingest_summary.json beside its parquet shards (downloads write records, a preparation
    a manifest): a folder scan reads parquet when there is any, JSONL (.jsonl, .jsonl.gz) otherwise, never .json."""
    shards = write_repository_shards(tmp_path / "shards", random_repositories(4, seed=2), num_files=1)
    (Path(shards) / "ingest_summary.json").write_text(json.dumps({"repositories": 4}, indent=1))
    assert DataArguments(dataset_name_or_path=shards).sources()[0].kind == "repositories"
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "docs.jsonl").write_text(json.dumps({"content": "text"}) + "\n")
    (documents / "summary.json").write_text(json.dumps({"rows": 1}, indent=1))
    assert DataArguments(dataset_name_or_path=str(documents)).sources()[0].kind == "documents"
    assert document_files(DataArguments(dataset_name_or_path=str(documents))) == [str(documents / "docs.jsonl")]


def test_a_literal_file_sep_stays_text_and_declared_structure_tokens_are_tokens(
    documents_dir, tokenizer_dir, tokenizer
):
    ids = {
        token: tokenizer.convert_tokens_to_ids(token) for token in ("<file_sep>", "<issue_start>", "<issue_comment>")
    }
    ids["eos"] = tokenizer.eos_token_id

    def tokens(**source):
        data = args(tokenizer_dir, dataset_name_or_path=documents_dir, **source)
        packed, report = build_packed_dataset(data.sources()[0].data_args, tokenizer, seed=0, shuffle=False)
        assert report.repositories == 40 and report.files_fim_psm == 0
        return np.concatenate([packed[i]["input_ids"] for i in range(len(packed))]).tolist(), packed

    plain, _ = tokens(fim_rate=0.0)
    assert not {ids["<file_sep>"], ids["<issue_start>"], ids["<issue_comment>"]} & set(plain)
    assert plain.count(ids["eos"]) >= 40  # each document's own <|endoftext|>, the literal one is text
    declared, packed = tokens(fim_rate=0.0, structure_tokens=["<issue_start>", "<issue_comment>"])
    assert declared.count(ids["<issue_start>"]) == declared.count(ids["<issue_comment>"]) == 120
    assert ids["<file_sep>"] not in declared
    text = tokenizer.decode(packed[0]["input_ids"])
    assert text.startswith("<issue_start>title ") and "the text <file_sep> and <|endoftext|> stay text" in text
    pieces = document_pieces("a<pr>b<issue_start>", ["<issue_start>"])
    assert pieces == [(False, "a<pr>b"), (True, "<issue_start>"), (True, "<|endoftext|>")]


def test_a_document_sources_filters_decontamination_near_dedup_and_pii(tmp_path, tokenizer_dir):
    from starcoder2_train.data.filters.decontamination import humaneval_texts
    from starcoder2_train.data.sources.documents import load_documents

    benchmark_text = max((text for _, text in humaneval_texts()), key=len)
    rng = np.random.default_rng(0)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo"]
    texts = [" ".join(rng.choice(words, size=60)) for _ in range(6)]
    texts += [texts[0], "a solution we copied:\n" + benchmark_text, "write to jane.doe@acme-widgets.org for access"]
    lines = "".join(json.dumps({"content": text}) + "\n" for text in texts)
    (tmp_path / "docs.jsonl").write_text(lines)
    data = args(tokenizer_dir, dataset_name_or_path=str(tmp_path), near_dedup=True, pii_redaction=True)
    kept, report = load_documents(data.sources()[0].data_args)
    contents = kept["content"]
    assert len(contents) == 7 and not any(benchmark_text in text for text in contents)  # the copy and the solution
    assert "write to <EMAIL> for access" in contents
    assert report.contaminated[0]["path"] == "document 7" and report.redactions
    assert sum(n for reason, n in report.files.items() if "humaneval" in reason) == 1


def test_bad_document_files_are_refused_naming_file_and_column(tmp_path):
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "no_content.parquet")
    pq.write_table(pa.table({"content": [1, 2]}), tmp_path / "numbers.parquet")
    (tmp_path / "lines.jsonl").write_text(json.dumps({"content": ["a", "list"]}) + "\n")
    for name, message in [
        ("no_content.parquet", "no content column (its columns: text)"),
        ("numbers.parquet", "column content is int64, not a string"),
        ("lines.jsonl", "column content holds list, not text"),
    ]:
        with pytest.raises(RecipeError, match=r"no_content|numbers|lines") as error:
            check_document_file(str(tmp_path / name))
        assert str(error.value).startswith(str(tmp_path / name)) and message in str(error.value)
    data = DataArguments(dataset_name_or_path=str(tmp_path / "no_content.parquet"), dataset_kind="documents")
    with pytest.raises(RecipeError, match="no_content.parquet: no content column"):
        build_packed_dataset(data.sources()[0].data_args, None, seed=0)


def test_a_mixture_of_repositories_and_documents(code_shards, documents_dir, tokenizer_dir, tokenizer):
    data = args(
        tokenizer_dir,
        dataset_mixture=[
            {"dataset_name_or_path": code_shards, "weight": 0.75, "name": "code"},
            {"dataset_name_or_path": documents_dir, "weight": 0.25, "name": "issues"},
        ],
    )
    dataset, report = build_training_data(data, tokenizer, training_args(max_steps=300, batch=4))
    names = [dataset.source_of(i) for i in range(len(dataset))]
    assert len(dataset) == 1200 and set(names) == {"code", "issues"}
    rows = {row["name"]: row for row in report.mixture}
    assert rows["issues"]["windows"] == names.count("issues") and rows["issues"]["passes"] > 1  # it repeats
    assert abs(rows["code"]["share"] - 0.75) < 0.05
    lines = "\n".join(report.summary_lines())
    assert "source issues:\n  documents: 40" in lines and "issues (documents): weight 0.2500, share" in lines


def test_the_model_card_lists_the_mixture(tmp_path):
    from starcoder2_train.hub.model_card import write_model_card

    mixture = [
        {"dataset_name_or_path": "bigcode/the-stack-v2-train-smol-ids", "weight": 8, "name": "stack"},
        json.dumps({"dataset_name_or_path": "data/mine", "weight": 2, "name": "mine", "fim_rate": 0.2}),  # CLI form
    ]
    card = write_model_card(str(tmp_path), {"dataset_mixture": mixture, "model_config": "starcoder2-3b"})
    assert "| stack | `bigcode/the-stack-v2-train-smol-ids` | 80.00% | - |" in card.text
    assert "| mine | `data/mine` | 20.00% | fim_rate: 0.2 |" in card.text
    assert "bigcode/the-stack-v2-train-smol-ids" in card.data.datasets


# Through the real commands.


def write_mixture_recipe(path: Path, shards: str, documents: str, tokenizer_dir: str, **more) -> Path:
    lines = [
        f"tokenizer_name_or_path: {tokenizer_dir}",
        "dataset_mixture:",
        f"  - {{dataset_name_or_path: {shards}, weight: 0.8, name: stack}}",
        f"  - {{dataset_name_or_path: {documents}, weight: 0.2, name: mine, structure_tokens: [<issue_start>]}}",
        "seq_length: 64",
        "model_config: test",
        "max_steps: 20",
        "per_device_train_batch_size: 2",
        "seed: 3",
        "report_to: none",
    ] + [f"{key}: {value}" for key, value in more.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_inspect_data_shows_each_samples_source_and_the_shares(tmp_path, code_shards, documents_dir, tokenizer_dir):
    recipe = write_mixture_recipe(
        tmp_path / "mix.yaml", code_shards, documents_dir, tokenizer_dir, output_dir=tmp_path
    )
    output = tmp_path / "samples.jsonl"
    command = [sys.executable, "scripts/inspect_data.py", str(recipe), "--num_proc", "2", "--num_samples", "12"]
    result = subprocess.run(
        command + ["--output", str(output)], cwd=ROOT, env=LAUNCH_ENV, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sources = [json.loads(line)["source"] for line in output.read_text().splitlines()]
    assert len(sources) == 12 and set(sources) <= {"stack", "mine"}
    assert f"sources of the samples: {' '.join(sources)}" in result.stdout
    assert "stack (repositories): weight 0.8000, share" in result.stdout
    assert "mine (documents): weight 0.2000, share" in result.stdout
    in_process = load_script("inspect_data").main([str(recipe), "--num_samples", "12", "--output", str(output)])
    assert [row["name"] for row in in_process.mixture] == ["stack", "mine"]


@pytest.mark.slow
def test_two_processes_train_on_a_mixture(tmp_path, code_shards, documents_dir, tokenizer_dir):
    pytest.importorskip("deepspeed")
    recipe = write_mixture_recipe(
        tmp_path / "mix.yaml",
        code_shards,
        documents_dir,
        tokenizer_dir,
        torch_dtype="float32",
        attn_implementation="sdpa",
        output_dir=tmp_path / "out",
        logging_steps=5,
        save_strategy="'no'",
        eval_strategy="'no'",
        bf16="false",
        dataloader_num_workers=1,
        disable_tqdm="true",
    )
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += ["accelerate_configs/deepspeed_zero2.yaml", "--num_processes", "2", "--main_process_port", "0"]
    command += ["scripts/run_pretrain.py", str(recipe)]
    result = subprocess.run(command, cwd=ROOT, env=LAUNCH_ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 20 and all(np.isfinite(e["loss"]) for e in state["log_history"] if "loss" in e)
    assert "mine (documents): weight 0.2000" in result.stdout + result.stderr
    assert os.path.isfile(tmp_path / "out" / "README.md")
