"""`prepare_data.py --executor ray` on a real local Ray instance: the local executor's folder, byte for byte.

Hermetic: Ray runs on this machine only, with no dashboard and no usage report (RAY_USAGE_STATS_ENABLED=0), in a
temporary folder of the test's own (so no other Ray instance on this machine is found or touched). The first test
runs the script as a user does, with no Ray running: the script starts a local instance and shuts it down. The
others share one instance the module starts (`local_ray`: 2 CPUs), which the script, finding Ray connected, uses
and leaves running. Skipped where Ray is not installed (the `ray` extra). About 90 s in all on this 2-core machine:
each Ray task is an actor process that imports the package."""

import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import LAUNCH_ENV, load_script, random_repositories, write_repository_shards
from test_manifest import recipe  # the tiny preparation recipe, with --key overrides

from starcoder2_train.configs import RecipeError
from starcoder2_train.data.prepare import make_executor
from starcoder2_train.data.store.prepared import held_out_part_path

try:
    import ray
except ImportError:
    ray = None

pytestmark = [
    pytest.mark.skipif(ray is None, reason="Ray is not installed (pip install -e '.[ray]')"),
    pytest.mark.slow,  # a Ray instance starts (~10 s here) and each preparation starts its actors
]
prepare_data = load_script("prepare_data")
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance of this module's own, hermetic: started here, no dashboard, no usage report, no network."""
    saved = {name: os.environ.get(name) for name in ("RAY_USAGE_STATS_ENABLED", "RAY_ADDRESS")}
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_repository_shards(tmp_path_factory.mktemp("ray") / "shards", random_repositories(40, seed=9), 4)


@pytest.fixture(scope="module")
def window_recipe(tmp_path_factory, shards, tokenizer_dir) -> tuple[str, Path]:
    """A recipe whose tokens are stored once (fim_level window), and the local executor's folder of it (2 tasks)."""
    folder = tmp_path_factory.mktemp("window")
    path = recipe(folder, shards, tokenizer_dir, fim_level="window")
    prepare_data.main([path, "--tasks", "2", "--disable_tqdm", "--output", str(folder / "local")])
    return path, folder / "local"


def prepared_files(folder) -> list[str]:
    """Every file of a prepared folder but datatrove's logging dirs (logs*/, near_dedup/logs-*/: its logs, timings
    and executor.json differ by nature: times, and the executor's class and options)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [name for name in dirs if not name.startswith("logs")]
        found += [os.path.relpath(os.path.join(root, name), folder) for name in files]
    return sorted(found)


def assert_same_files(local, ray_run) -> None:
    """The same files, byte for byte: token stores, their indexes, held-out parquet, manifest, reports."""
    files = prepared_files(local)
    assert files == prepared_files(ray_run)
    assert "manifest.json" in files and any(name.endswith(".parquet") for name in files)  # held-out repositories
    assert any(name.endswith(".tokens") for name in files)
    assert [name for name in files if not filecmp.cmp(local / name, ray_run / name, shallow=False)] == []


def test_the_command_starts_ray_and_writes_the_local_executors_folder_byte_for_byte(window_recipe, tmp_path):
    """`python scripts/prepare_data.py ... --executor ray` as a user runs it, with no Ray running: the script
    starts a local instance (its temporary folder one of the test's, so no other Ray on this machine is found),
    runs the 2 tasks there, shuts it down, and the folder is the local executor's. Tokens stored once (fim_level
    window)."""
    path, local = window_recipe
    common = [path, "--tasks", "2", "--disable_tqdm"]
    env = {name: value for name, value in LAUNCH_ENV.items() if name != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as temp_dir:  # short: socket paths <= 107 bytes
        env.update(RAY_TMPDIR=temp_dir, RAY_USAGE_STATS_ENABLED="0")
        command = [sys.executable, "scripts/prepare_data.py", *common, "--output", str(tmp_path / "ray")]
        result = subprocess.run(
            [*command, "--executor", "ray"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Started a local Ray instance" in result.stderr + result.stdout
    assert "train: 37 repositories" in result.stdout
    assert_same_files(local, tmp_path / "ray")


def test_ray_runs_the_near_dedup_stages_in_turn_and_writes_the_local_executors_folder(
    local_ray, shards, tokenizer_dir, tmp_path
):
    """Three near-dedup stages, then the tokens (per-epoch stores, 2 epochs): each stage waits for the one before;
    2 bands: 2 tasks, 2, then 1, then 2. Ray connected by the test: the script uses it and leaves it running."""
    path = recipe(tmp_path, shards, tokenizer_dir, fim_level="file", near_dedup=True, near_dedup_buckets=2)
    common = [path, "--tasks", "2", "--epochs", "2", "--disable_tqdm"]
    prepare_data.main([*common, "--output", str(tmp_path / "local")])
    prepare_data.main([*common, "--output", str(tmp_path / "ray"), "--executor", "ray"])
    assert ray.is_initialized()
    assert_same_files(tmp_path / "local", tmp_path / "ray")
    stages = sorted(os.listdir(tmp_path / "ray" / "near_dedup"))
    assert [name for name in stages if name.startswith("logs-")] == [
        "logs-near-dup-groups",
        "logs-near-dup-pairs",
        "logs-near-dup-signatures",
    ]


def test_a_failed_ray_task_is_named_and_the_rerun_runs_it_alone(local_ray, window_recipe, tmp_path):
    """Task 1's held-out parquet cannot be written (a folder where its file goes): the command ends with one line
    naming the stage and the task's log; with the folder gone, the same command runs task 1 alone, and the folder
    is the one the local executor writes in one go."""
    (path, local), output = window_recipe, tmp_path / "ray"
    ray_command = [path, "--tasks", "2", "--disable_tqdm", "--output", str(output), "--executor", "ray"]
    blocked = f"{held_out_part_path(str(output), 1, 2)}.partial"
    os.makedirs(blocked)
    with pytest.raises(RecipeError, match=r"1 of 2 tasks of .*logs failed .*task_00001\.log\); the same command"):
        prepare_data.main(ray_command)
    assert os.listdir(output / "logs" / "completions") == ["00000"]
    assert "IsADirectoryError" in (output / "logs" / "logs" / "task_00001.log").read_text()
    done = output / "train" / "pieces" / "part-00000-of-00002.tokens"
    written = os.stat(done).st_mtime_ns
    os.rmdir(blocked)
    prepare_data.main(ray_command)
    assert os.stat(done).st_mtime_ns == written  # task 0 was not run again
    assert sorted(os.listdir(output / "logs" / "completions")) == ["00000", "00001"]
    assert_same_files(local, output)


def test_a_stage_stops_at_once_when_the_stage_before_failed(local_ray, tmp_path):
    """datatrove's own `depends` would poll the failed stage every 2 minutes, forever; here the error names it."""

    def fail(data, rank, world_size):
        raise OSError("disk quota exceeded (injected)")

    ran = str(tmp_path / "ran")

    def touch(data, rank, world_size):
        open(ran, "w").close()

    before = make_executor("ray", [fail], tasks=1, logging_dir=str(tmp_path / "before"))
    after = make_executor("ray", [touch], tasks=1, logging_dir=str(tmp_path / "after"), depends=before)
    start = time.monotonic()
    with pytest.raises(RecipeError, match=r"1 of 1 tasks of .*before failed"):
        after.run()
    assert not os.path.exists(ran) and time.monotonic() - start < 60


def test_a_task_no_node_can_hold_is_refused_before_it_waits_forever(local_ray, tmp_path):
    """A placement group no node can hold waits forever in datatrove; here the error names both sizes."""
    stage = make_executor("ray", [lambda data, rank, world_size: data], tasks=1, logging_dir=str(tmp_path / "logs"))
    stage.cpus_per_task = 64  # the module's instance has 2 CPUs
    with pytest.raises(
        RecipeError, match=r"a task reserves 64 CPU\(s\) and 128 GB of Ray memory, and the largest node"
    ):
        stage.run()
    assert not os.path.exists(tmp_path / "logs" / "completions")


def test_without_ray_the_command_says_what_to_install(window_recipe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    path, _ = window_recipe
    with pytest.raises(RecipeError, match=r"--executor ray needs Ray: pip install -e '\.\[ray\]'"):
        prepare_data.main([path, "--tasks", "2", "--output", str(tmp_path / "ray"), "--executor", "ray"])
    assert not os.path.exists(tmp_path / "ray" / "logs" / "completions")
