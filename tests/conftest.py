"""Shared fixtures: everything a test needs is made here, offline (no Hub, no network)."""

import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models run faster on one thread than on two shared cores, and the golden losses stay bit-stable.
torch.set_num_threads(1)

# The environment of every `accelerate launch` a test makes: DeepSpeed on the CPU, offline, one thread per rank.
LAUNCH_ENV = dict(
    os.environ,
    CUDA_VISIBLE_DEVICES="",
    DS_ACCELERATOR="cpu",
    HF_HUB_OFFLINE="1",
    OMP_NUM_THREADS="1",
    PYTHONWARNINGS="ignore::FutureWarning",
    TORCH_CPP_LOG_LEVEL="ERROR",
    TOKENIZERS_PARALLELISM="false",
)

SNIPPETS = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, x):\n        self.items.append(x)\n",
    "import os\nimport sys\n\nfor name in os.listdir('.'):\n    print(name, file=sys.stderr)\n",
    '#include <stdio.h>\nint main(void) {\n    printf("hello %d\\n", 42);\n    return 0;\n}\n',
    "function greet(name) {\n  return `Hello, ${name}!`;\n}\nmodule.exports = { greet };\n",
    'fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!("{:?}", v);\n}\n',
    "SELECT id, name FROM users WHERE age > 30 ORDER BY name;\n",
    "# Title\n\nSome *markdown* text with `code` and ünïcödé — 日本語.\n",
]


def random_code(rng: random.Random, min_lines: int = 1, max_lines: int = 12) -> str:
    """Plausible source text made of known snippets and random identifiers, unicode included."""
    lines = []
    for _ in range(rng.randint(min_lines, max_lines)):
        if rng.random() < 0.5:
            lines.append(rng.choice(SNIPPETS))
        else:
            name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_éλ") for _ in range(rng.randint(1, 10)))
            lines.append(f"{name} = {rng.randint(0, 10**6)}  # {name}\n")
    return "".join(lines)


def random_repositories(num_repos: int, seed: int = 0, max_files: int = 5) -> list[dict]:
    rng = random.Random(seed)
    repos = []
    for r in range(num_repos):
        files = []
        for f in range(rng.randint(1, max_files)):
            ext = rng.choice([("py", "Python"), ("c", "C"), ("js", "JavaScript"), ("rs", "Rust")])
            files.append(
                {"path": f"src/dir{f % 2}/file_{f}.{ext[0]}", "content": random_code(rng), "language": ext[1]}
            )
        repos.append({"repo_name": f"owner{r % 7}/repo-{r}", "files": files})
    return repos


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE with StarCoder2's special tokens, trained here on synthetic code."""
    from starcoder2_train.data.tokens.tokenizer import train_tokenizer

    texts = [r["files"][0]["content"] for r in random_repositories(300, seed=123)]
    texts += ["<fim_middle> <|endoftext|> <file_sep>" * 20]  # literal special-token text in the corpus
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(iter(texts), vocab_size=600, output_dir=path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def load_script(name: str):
    """Import scripts/NAME.py by its path; scripts/ never goes on sys.path, where evaluate.py would shadow
    the `evaluate` library."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_repository_shards(directory, repos: list[dict], num_files: int = 2) -> str:
    """Write `repos` as Stack v2 per-repository parquet shards; returns the directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(directory, exist_ok=True)
    per_file = -(-len(repos) // num_files)
    for index in range(num_files):
        part = repos[index * per_file : (index + 1) * per_file]
        table = pa.Table.from_pylist([{"repo_name": r["repo_name"], "files": r["files"]} for r in part])
        pq.write_table(table, os.path.join(directory, f"train-{index:05d}-of-{num_files:05d}.parquet"))
    return str(directory)


@pytest.fixture(scope="session")
def code_shards(tmp_path_factory):
    """Two per-repository parquet shards of 120 synthetic repositories."""
    return write_repository_shards(tmp_path_factory.mktemp("shards"), random_repositories(120, seed=11))


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory):
    """One real one-node SLURM cluster for the session (tests/slurm_cluster.py), started at its first use and shared
    by test_slurm.py and test_prepare_slurm.py; the environment its commands need (SLURM_CONF)."""
    import slurm_cluster

    with slurm_cluster.one_node_cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env


def prepare_recipe(tmp_path, shards, tokenizer_dir, **keys) -> str:
    """A recipe for the prepare_data.py tests, written to tmp_path/recipe.yaml: the test model, `shards`, the
    tokenizer, 64-token windows, a tenth of the repositories held out, output_dir tmp_path/run; `keys` add or
    replace keys (None: the key left out)."""
    values = dict(
        model_config="test",
        dataset_name_or_path=shards,
        tokenizer_name_or_path=tokenizer_dir,
        seq_length=64,
        eval_fraction=0.1,
        output_dir=str(tmp_path / "run"),
    )
    values.update(keys)
    path = tmp_path / "recipe.yaml"
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in values.items() if value is not None))
    return str(path)
