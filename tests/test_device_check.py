"""scripts/device_check.py on the CPU: its plan, its kernels step, memory_peaks.json, and the whole rehearsal."""

import json
import subprocess
from pathlib import Path

import pytest
from conftest import load_script

from starcoder2_train.benchmarking import device_cases
from starcoder2_train.benchmarking.kernels import choose_kernel, read_kernels

ROOT = Path(__file__).parents[1]
CASE_KEYS = {"name", "recipe", "overrides", "world_size", "zero_config", "attention", "peak_allocated_gb"}


def head_commit() -> str:
    completed = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return completed.stdout.strip() if completed.returncode == 0 else "unknown"


def words_of(step) -> dict:
    """benchmark.py words as {--key: value} (the last value of a repeated key)."""
    pairs = {}
    for index, word in enumerate(step.words):
        if word.startswith("--"):
            nxt = step.words[index + 1] if index + 1 < len(step.words) else ""
            pairs[word] = nxt if not nxt.startswith("--") else "true"
    return pairs


def test_the_plan_runs_the_recipes_under_zero2_and_fits_the_budget():
    kernels = [
        {"kernel": "sdpa (transformers' packed mask)", "seq_length": 4, "forward_backward_ms": 9.0},
        {"kernel": "sdpa_varlen", "seq_length": 4, "forward_backward_ms": 2.0, "correct": True},
        {"kernel": "flex_attention", "seq_length": 4, "forward_backward_ms": 1.0, "correct": True},
    ]
    steps = {step.name: step for step in device_cases.plan(device_cases.Settings("/tmp/x"), kernels)}
    assert list(steps) == ["4k", "16k", "4k-plain", "dropout-4k", "float8", "16k-flattening"]
    assert [name for name, step in steps.items() if not step.optional] == list(device_cases.CORE)
    planned, parts = device_cases.PLANNED, device_cases.PARTS
    core = planned["kernels"] + sum(planned[name] for name in device_cases.CORE)
    assert core <= 240 and device_cases.BUDGET_SECONDS <= 300  # what matters, after the environment step
    assert core + 2 * parts["compile"] <= device_cases.BUDGET_SECONDS + 5  # a second compilation per ours process
    for name, step in steps.items():  # each limit survives a second compilation
        assert step.limit >= step.planned + parts["compile"] * device_cases.COMPILING.get(name, 0)
    # 4k: the parent, ours (start, build, DeepSpeed, one compilation, 3 warm-up steps, 6 s), its profile, flattening
    ours_4k = parts["process_start"] + parts["build"] + parts["deepspeed_init"] + parts["compile"] + 3 * 1.0 + 6
    flattening_4k = parts["process_start"] + parts["build"] + parts["deepspeed_init"] + 3 * 1.1 + 6
    assert planned["4k"] == round(parts["parent"] + ours_4k + parts["profile"] + flattening_4k)
    four_k, sixteen_k = words_of(steps["4k"]), words_of(steps["16k"])
    assert four_k["--recipe"] == device_cases.RECIPE_4K and sixteen_k["--recipe"] == device_cases.RECIPE_16K
    for step in steps.values():
        words = words_of(step)
        assert words["--deepspeed"] == device_cases.ZERO and words["--repeats"] == "1"
        assert "--per_device_train_batch_size" not in words and "--gradient_accumulation_steps" not in words
    assert four_k["--attn_implementation"] == "sdpa_varlen"  # the 3B preset's dropout 0.1 rules flex out
    assert four_k["--baselines"] == "flattening" and "--baselines" not in sixteen_k
    assert four_k["--profile_steps"] == str(device_cases.PROFILE_STEPS) and four_k["--seconds"] == "6.0"
    assert sixteen_k["--model_config"] == "starcoder2-3b"  # from scratch: long_context.yaml names a checkpoint
    plain, flattening_16k = words_of(steps["4k-plain"]), words_of(steps["16k-flattening"])
    assert plain["--skip_ours"] == "true" and plain["--baselines"] == "plain"
    assert flattening_16k["--skip_ours"] == "true" and flattening_16k["--baselines"] == "flattening"
    dropout = words_of(steps["dropout-4k"])
    assert dropout["--config"] == "attention_dropout=0.0" and dropout["--attn_implementation"] == "flex_attention"
    float8 = words_of(steps["float8"])
    assert float8["--variant"] == "float8=--float8 true" and float8["--steps"] == str(device_cases.FLOAT8_STEPS)
    assert float8["--compile_layers"] == "false"


def test_the_documented_device_command_fits_the_device_time_with_a_rerun():
    """A ~180 s machine start and two calls of timeout_s inside 900 s; inside one call, the environment step's and
    the device check's timeouts; the check's timeout above its budget; the step is chained with &&."""
    import re

    text = (ROOT / "scripts" / "device_check.py").read_text()
    timeout_s = int(re.search(r"timeout_s (\d+)", text).group(1))
    command = text[text.index("export PYTHONPATH=/tmp/site") : text.index("(4 files come back")]
    environment, check = (int(value) for value in re.findall(r"timeout (\d+) python3", command))
    assert 180 + 2 * timeout_s <= 900 - 30 and environment + check + 5 <= timeout_s
    assert check >= device_cases.BUDGET_SECONDS + 10
    assert "device_setup.py \\\n        install --wheel_dir .whl --target /tmp/site && " in command
    assert len(" ".join(command.replace("\\\n", " ").split())) <= 2000  # the device tool's limit


def test_memory_peaks_name_each_path_process_with_its_recipe_words(tmp_path):
    overrides = ["--deepspeed", device_cases.ZERO, "--attn_implementation", "sdpa_varlen"]
    report = {
        "label": "4k",
        "machine": "NVIDIA H200",
        "recipe": device_cases.RECIPE_4K,
        "recipe_overrides": overrides,
        "path_recipe_overrides": {"ours": overrides, "plain": overrides},
        "config_overrides": [],
        "seq_length": 4096,
        "micro_batch": 2,
        "all_repeats": {
            "ours": [{"peak_allocated_gb": 70.5, "attention": "sdpa_varlen"}, {"peak_allocated_gb": 71.0}],
            "plain": [{"error": "out of memory: CUDA", "peak_allocated_gb": 139.0, "attention": "sdpa"}],
            "gemm": [{"ceiling_tflops": 700.0}],
        },
    }
    written = device_cases.write_memory_peaks(str(tmp_path / "memory_peaks.json"), [report], tiny=False)
    assert json.loads((tmp_path / "memory_peaks.json").read_text()) == written
    assert written["device"] == "NVIDIA H200" and written["commit"] == head_commit()
    ours, plain = written["cases"]
    assert CASE_KEYS <= ours.keys()
    assert ours["name"] == "4k-ours" and ours["peak_allocated_gb"] == 71.0 and ours["attention"] == "sdpa_varlen"
    assert ours["overrides"] == overrides and ours["zero_config"] == device_cases.ZERO and ours["world_size"] == 1
    assert plain["error"].startswith("out of memory") and plain["peak_allocated_gb"] == 139.0


def test_device_check_kernels_step_writes_its_objects_with_provenance(tmp_path):
    device_check = load_script("device_check")
    device_check.main(["--kernels_only", "--tiny", "--output_dir", str(tmp_path)])
    written = json.loads((tmp_path / "attention_kernels.json").read_text())
    assert written["commit"] == head_commit() and written["date"].startswith("20")
    assert written["command"] == f"python scripts/device_check.py --kernels_only --tiny --output_dir {tmp_path}"
    kernels = read_kernels(str(tmp_path / "attention_kernels.json"))
    assert kernels == written["kernels"]
    assert {(entry["kernel"], entry["seq_length"]) for entry in kernels} == {
        (kernel, length) for kernel in ("sdpa (transformers' packed mask)", "sdpa_blocked") for length in (1024, 2048)
    }
    assert all("error" not in entry and entry["dropout_forward_backward_ms"] > 0 for entry in kernels), kernels
    assert next(entry for entry in kernels if entry["kernel"] == "sdpa_blocked")["correct"]
    assert choose_kernel(kernels, model_attention_dropout=0.0) in ("sdpa", "sdpa_blocked")
    assert read_kernels(str(tmp_path / "missing.json")) == []
    losses = {
        (e["kernel"], e["tokens"]): e for e in json.loads((tmp_path / "loss_kernels.json").read_text())["kernels"]
    }
    for tokens in (1024, 2048):
        assert losses[("transformers", tokens)]["correct"] and losses[("chunked", tokens)]["correct"]
        assert "status" in losses[("liger", tokens)] and "status" in losses[("cut_cross_entropy", tokens)]  # CPU
    gemm = json.loads((tmp_path / "gemm.json").read_text())
    assert gemm["ceiling_tflops"] > 0 and len(gemm["gemms"]) == 7 * 3  # 7 weights, 3 GEMMs each


@pytest.mark.slow
def test_device_check_rehearses_every_step_on_the_cpu(tmp_path):
    device_check = load_script("device_check")
    summary = device_check.main(["--tiny", "--output_dir", str(tmp_path), "--budget_seconds", "1500"])
    steps = {step["label"]: step for step in summary["steps"]}
    assert list(steps) == ["kernels", "4k", "16k", "4k-plain", "dropout-4k", "float8", "16k-flattening"]
    assert all("skipped" not in step for step in steps.values()), steps
    for case, paths in (("4k", ("ours", "flattening")), ("16k", ("ours",)), ("4k-plain", ("plain",))):
        for path in paths:
            result = steps[case]["results"][path]
            assert result["real_tokens_per_second_per_device"] > 0 and result["deepspeed"], (case, path, result)
    assert list(steps["16k-flattening"]["results"]) == ["flattening"]
    assert steps["4k"]["profile"]["profile"]["share_of_wall"]["gemm"] > 0  # in ours' process
    assert [process["path"] for process in steps["4k"]["processes"]] == ["ours", "flattening"]
    assert summary["ratios"]["4k"].keys() >= {"plain", "flattening", "vs_best_baseline"}
    assert steps["dropout-4k"]["config_overrides"] == ["attention_dropout=0.1"]  # tiny's own dropout is 0.0
    assert "float8" in steps["float8"]["results"]  # on a CPU float8 fails; the error is recorded
    written = json.loads((tmp_path / "device_check.json").read_text())
    assert written["commit"] == head_commit() and written["command"].startswith("python scripts/device_check.py")
    assert written["attention_kernels"]["kernels"] == read_kernels(str(tmp_path / "attention_kernels.json"))
    peaks = json.loads((tmp_path / "memory_peaks.json").read_text())
    assert peaks["commit"] == head_commit() and peaks["device"]
    names = [case["name"] for case in peaks["cases"]]
    assert {"4k-ours", "4k-plain", "4k-flattening", "16k-ours", "16k-flattening", "dropout-4k-ours"} <= set(names)
    for case in peaks["cases"]:
        assert CASE_KEYS <= case.keys() and isinstance(case["peak_allocated_gb"], float) and case["world_size"] == 1
        assert case["recipe"] in (device_cases.RECIPE_4K, device_cases.RECIPE_16K)
        assert case["zero_config"] == device_cases.ZERO and "--deepspeed" in case["overrides"]


def test_a_step_killed_at_its_limit_takes_the_processes_it_started_along(tmp_path):
    """run_limited kills the step's whole process group: a path process started without a session of its own
    (as benchmark.py starts them) dies with it, and nothing keeps holding the device."""
    import os
    import sys
    import time

    from starcoder2_train.benchmarking.isolated import run_limited

    pid_file = tmp_path / "grandchild.pid"
    grandchild = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    step = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(60)"
    start = time.perf_counter()
    assert run_limited([sys.executable, "-c", step], limit=3) == "killed after 3 s"
    assert time.perf_counter() - start < 30
    pid = int(pid_file.read_text())
    for _ in range(50):  # the orphan is reaped by init a moment after the kill
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {pid} outlived its step")
    assert run_limited([sys.executable, "-c", "pass"], limit=30) == "exit 0"


# The environment step (device_env.py, scripts/device_setup.py): a fake wheel folder, stdlib and fake modules.


def fake_wheel(folder: Path, name="fakepkg", version="1.0", requires=(), init="VALUE = 1\n") -> Path:
    """A minimal pure-Python wheel: the package `name` (its __init__.py is `init`) and its dist-info."""
    import zipfile

    dist = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {requirement}\n" for requirement in requires)
    files = {
        f"{name}/__init__.py": init,
        f"{dist}/METADATA": metadata,
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist}/RECORD"])
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def wheel_folder(tmp_path: Path, python: str | None = None, **wheel) -> Path:
    import sys

    folder = tmp_path / "whl"
    folder.mkdir()
    fake_wheel(folder, **wheel)
    python = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    (folder / "device_env.json").write_text(json.dumps({"python": python}))
    return folder


STDLIB_AND_FAKE = (("json", "stdlib"), ("fakepkg", "fakepkg"), ("email.message", "stdlib"))


def test_the_environment_step_stops_at_the_first_missing_module_naming_it(tmp_path, capsys):
    from starcoder2_train.benchmarking import device_env

    folder = wheel_folder(tmp_path)
    required = (*STDLIB_AND_FAKE[:2], ("no_such_module_x", "no-such-dist"), ("also_missing_y", "other-dist"))
    status = device_env.prepare(
        str(folder), str(tmp_path / "site"), str(ROOT / "src"), ("fakepkg==1.0",), (), required, ()
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert status == 1 and len(lines) == 1, lines
    assert lines[0].startswith("device environment: cannot import no_such_module_x (ModuleNotFoundError")
    assert "add no-such-dist's wheel" in lines[0] and "also_missing_y" not in lines[0]
    assert (tmp_path / "site" / "fakepkg" / "__init__.py").is_file()  # installed before the imports


def test_the_environment_step_passes_when_everything_is_there(tmp_path, capsys):
    from starcoder2_train.benchmarking import device_env

    folder = wheel_folder(tmp_path, requires=["packaging>=20", "absent-thing>=1; extra == 'never'"])
    optional = (("no_optional_module_z", "optional-dist"),)
    status = device_env.prepare(
        str(folder), str(tmp_path / "site"), str(ROOT / "src"), ("fakepkg==1.0",), (), STDLIB_AND_FAKE, optional
    )
    line = capsys.readouterr().out.strip()
    assert status == 0, line
    assert "1 wheels installed" in line and "3 modules imported" in line and "Requires-Dist met" in line
    assert "no_optional_module_z not available (optional-dist" in line


def test_the_environment_step_checks_each_carried_wheels_requirements(tmp_path, capsys):
    from starcoder2_train.benchmarking import device_env

    folder = wheel_folder(tmp_path, requires=["packaging>=20", "no-such-dist>=2.4"])
    status = device_env.prepare(
        str(folder), str(tmp_path / "site"), str(ROOT / "src"), ("fakepkg==1.0",), (), STDLIB_AND_FAKE, ()
    )
    line = capsys.readouterr().out.strip()
    assert status == 1 and line == (
        "device environment: fakepkg 1.0 requires no-such-dist>=2.4, which is not installed: add its wheel"
    )


def test_the_environment_step_refuses_wheels_for_another_interpreter_by_name(tmp_path):
    import sys

    folder = wheel_folder(tmp_path, python="2.7")
    command = [sys.executable, str(ROOT / "scripts" / "device_setup.py"), "install", "--wheel_dir", str(folder)]
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")}
    completed = subprocess.run([*command, "--target", str(tmp_path / "site")], capture_output=True, text=True, env=env)
    assert completed.returncode == 1 and completed.stderr == ""
    assert completed.stdout.startswith(f"device environment: the wheels in {folder} are for Python 2.7 (cp27) and ")
    assert not (tmp_path / "site").exists()  # nothing installed


def test_the_wheel_folder_holds_each_listed_wheel_once_for_this_interpreter(tmp_path):
    from starcoder2_train.benchmarking import device_env

    folder = wheel_folder(tmp_path)
    fake_wheel(folder, version="2.0")
    with pytest.raises(device_env.EnvironmentProblem, match="holds 2 wheels of fakepkg"):
        device_env.check_wheel_dir(str(folder), ("fakepkg==1.0",))
    with pytest.raises(device_env.EnvironmentProblem, match="lacks the wheel hjson==3.1.0"):
        device_env.check_wheel_dir(str(folder), ("hjson==3.1.0",))
    assert device_env.loads_on("pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.whl", "3.12")
    assert not device_env.loads_on("pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.whl", "3.11")
    assert device_env.loads_on("torchao-0.18.0-cp310-abi3-manylinux_2_28_x86_64.whl", "3.12")
    assert device_env.loads_on("hjson-3.1.0-py3-none-any.whl", "3.11")


def test_one_list_of_wheels_names_every_carried_distribution_once():
    from starcoder2_train.benchmarking import device_env

    items = [*device_env.WHEELS, *device_env.OPTIONAL_WHEELS]
    names = [device_env.normalized(device_env.name_version(item)[0]) for item in items]
    assert len(names) == len(set(names)) and all("==" in item for item in items)
    required = {device_env.normalized(distribution) for _, distribution in device_env.REQUIRED}
    assert {device_env.normalized(device_env.name_version(item)[0]) for item in device_env.WHEELS} <= required
    modules = [module for module, _ in device_env.REQUIRED]
    assert {"torch", "transformers", "accelerate", "deepspeed", "pydantic", "hjson", "einops", "msgpack"} <= set(
        modules
    )
    assert modules[-1].startswith("starcoder2_train.") and modules.index("torch") == 0


def test_an_optional_wheel_that_does_not_import_is_removed_so_it_cannot_break_the_rest(tmp_path, capsys):
    """transformers imports torchao whenever it finds it: a broken optional wheel is taken out of the target."""
    from starcoder2_train.benchmarking import device_env

    folder = wheel_folder(tmp_path)
    fake_wheel(folder, name="brokenopt", version="0.1", init="raise ImportError('built for another torch')\n")
    status = device_env.prepare(
        str(folder),
        str(tmp_path / "site"),
        str(ROOT / "src"),
        ("fakepkg==1.0",),
        ("brokenopt==0.1",),
        STDLIB_AND_FAKE,
        (("brokenopt", "brokenopt"),),
    )
    line = capsys.readouterr().out.strip()
    assert status == 0, line
    assert "2 wheels installed" in line and "brokenopt not available (brokenopt; ImportError: built for" in line
    assert f"removed from {tmp_path / 'site'}" in line
    left = sorted(path.name for path in (tmp_path / "site").iterdir())
    assert left == ["fakepkg", "fakepkg-1.0.dist-info"], left


def test_ours_first_process_profiles_after_its_timed_steps(tmp_path):
    """--profile_steps on ours' first process: the timed figures first, then the profiled steps in the same
    process (no profiled process of its own: the device check's 4k step saves a start, a build and a compile)."""
    benchmark = load_script("benchmark")
    words = ["--model_config", "test", "--seq_length", "128", "--per_device_train_batch_size", "2"]
    words += ["--attn_implementation", "sdpa_blocked", "--use_cpu", "true", "--steps", "1", "--warmup", "1"]
    words += ["--synthetic", "30", "--max_tokens", "8000", "--profile_steps", "2", "--only_path", "ours"]
    written = benchmark.main([*words, "--output", str(tmp_path / "ours.json")])
    result = written["result"]
    assert result["timed_steps"] == 1 and result["real_tokens_per_second_per_device"] > 0
    assert result["profile"]["steps"] == 2 and result["profile"]["share_of_wall"]["gemm"] > 0
    assert len(result["losses"]) == 1 + 1 + 2  # one micro batch a step: warm-up, timed, profiled
