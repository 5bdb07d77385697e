"""The device check's environment: the one list of wheels carried to the device image (downloaded here, installed
there), and the environment step that stops before any device time is spent on steps.

    PYTHONPATH=src .venv/bin/python scripts/device_setup.py download --wheel_dir .whl     # here (network)
    PYTHONPATH=src python3 scripts/device_setup.py install --wheel_dir .whl --target /tmp/site   # there, first

`download` fetches WHEELS and OPTIONAL_WHEELS for the image's interpreter (IMAGE_PYTHON, KINDS.md: Python
3.12.3, so cp312 manylinux wheels), builds deepspeed's wheel from its sdist (BUILT; DS_BUILD_OPS=0, so no CUDA
op is compiled here) and writes MANIFEST, which names the interpreter the wheels are for. `install`, run with the
image's python3 before anything else, stops at the first of these that fails, with exit status 1 and one line
naming what to fix:
  1. the interpreter is the manifest's (wheels for another Python mean the wrong download: pip would refuse the
     compiled ones, pydantic-core and regex, one at a time), and no wheel in the folder is compiled for another;
  2. every wheel of the list is in the folder, exactly once (two versions of one stop pip's whole install);
  3. pip installs them into --target (--no-index --no-deps: nothing is fetched there);
  4. a fresh interpreter, with the target and src/ first on its path, imports OPTIONAL (reported, never fatal);
     an optional wheel that does not import is removed from the target, since transformers imports torchao, say,
     whenever it finds it (transformers.quantizers.auto, seen with 5.24.0's -X importtime here), and a broken
     one would break the required imports;
  5. another fresh interpreter imports every module of REQUIRED in order (the third-party modules, deepspeed's
     modules that its engine build imports, then the device check's own modules, which import the rest), then
     checks each carried wheel's Requires-Dist (markers evaluated, extras skipped) against the version the path
     gives.

Versions (read off .venv with pip show, 2026-12-06): accelerate 1.16.0 and deepspeed 0.19.8 as tested here.
transformers 5.24.0, not the 5.25.0 tested here: 5.25.0 requires huggingface-hub>=2.4 (which requires httpx2,
httpcore2, truststore and click>=8.4.2) and kernels>=0.19.1 (which requires tomlkit), none of which the image
holds, while 5.24.0 requires huggingface-hub>=1.31 (the image has 1.33.0), tokenizers>=0.23.1 (0.23.2) and
safetensors>=0.8.0 (0.8.0). regex is carried because transformers needs >=2025.10.22 and the image's version is
unknown. The image holds einops, msgpack, ninja, psutil, py-cpuinfo, pyyaml, pyarrow and typer (KINDS.md's
package list), and they are import-checked all the same; it lacks pydantic (with pydantic-core, annotated-types
and typing-inspection; typing-extensions is carried too, as pydantic needs >=4.16.0 and the image's version is
unknown) and hjson, which deepspeed imports.
"""

import importlib
import json
import os
import re
import subprocess
import sys
import time

IMAGE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64")
PLATFORMS += ("manylinux2014_x86_64",)
WHEELS = (
    "transformers==5.24.0",
    "accelerate==1.16.0",
    "deepspeed==0.19.8",
    "hjson==3.1.0",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",
    "regex==2026.12.2",
)
OPTIONAL_WHEELS = ("liger-kernel==0.8.5", "cut-cross-entropy==25.1.1", "torchao==0.18.0")
BUILT = ("deepspeed",)  # sdist only on PyPI: built here with `pip wheel`
MANIFEST = "device_env.json"
# (module, the distribution that provides it), imported in this order; the first that fails stops the step.
REQUIRED = (
    ("torch", "torch"),
    ("numpy", "numpy"),
    ("yaml", "pyyaml"),
    ("pyarrow", "pyarrow"),
    ("packaging", "packaging"),
    ("regex", "regex"),
    ("safetensors", "safetensors"),
    ("tokenizers", "tokenizers"),
    ("huggingface_hub", "huggingface-hub"),
    ("typing_extensions", "typing-extensions"),
    ("annotated_types", "annotated-types"),
    ("typing_inspection", "typing-inspection"),
    ("pydantic_core", "pydantic-core"),
    ("pydantic", "pydantic"),
    ("hjson", "hjson"),
    ("einops", "einops"),
    ("msgpack", "msgpack"),
    ("psutil", "psutil"),
    ("cpuinfo", "py-cpuinfo"),
    ("transformers", "transformers"),
    ("accelerate", "accelerate"),
    ("transformers.trainer", "transformers"),
    ("deepspeed", "deepspeed"),
    # What DeepSpeed 0.19.8's initialize imports beyond `import deepspeed` (seen on the CPU: sys.modules after
    # a ZeRO-2 engine build).
    ("deepspeed.runtime.zero.stage_1_and_2", "deepspeed"),
    ("deepspeed.ops.op_builder.all_ops", "deepspeed"),
    ("deepspeed.module_inject.auto_ep_layer", "deepspeed"),
    ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed"),
    ("transformers.integrations.deepspeed", "transformers"),
    ("starcoder2_train.benchmarking.device_cases", "starcoder2_train (src/)"),
    ("starcoder2_train.benchmarking.child", "starcoder2_train (src/)"),
    ("starcoder2_train.benchmarking.kernels", "starcoder2_train (src/)"),
    ("starcoder2_train.benchmarking.loss_kernels", "starcoder2_train (src/)"),
    ("starcoder2_train.benchmarking.gemm", "starcoder2_train (src/)"),
    ("starcoder2_train.benchmarking.profile", "starcoder2_train (src/)"),
)
OPTIONAL = (
    ("liger_kernel", "liger-kernel"),
    ("cut_cross_entropy", "cut-cross-entropy"),
    ("torchao.float8", "torchao"),
)
PREFIX = "device environment:"


class EnvironmentProblem(Exception):
    """One line saying what is missing or broken and what to do."""


def name_version(item: str) -> tuple[str, str]:
    name, _, version = item.partition("==")
    return name, version


def normalized(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427: runs of -_. become _), lower case."""
    return re.sub(r"[-_.]+", "_", name).lower()


def python_tag(version: str) -> str:
    return "cp" + version.replace(".", "")


def running_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def wheel_files(wheel_dir: str) -> dict[str, list[str]]:
    """{normalized distribution name: [wheel file names]} of the folder."""
    found = {}
    for file in sorted(os.listdir(wheel_dir)) if os.path.isdir(wheel_dir) else []:
        if file.endswith(".whl"):
            found.setdefault(normalized(file.split("-")[0]), []).append(file)
    return found


def wheel_for(distribution: str, modules_wheels: tuple) -> str:
    """What to add for `distribution`: its pinned name==version where the list has one."""
    pinned = [item for item in modules_wheels if normalized(name_version(item)[0]) == normalized(distribution)]
    return pinned[0] if pinned else distribution


def loads_on(file: str, version: str) -> bool:
    """Whether the wheel `file` loads on CPython `version`: pure (py3), built for it (cp312), or for the stable
    ABI of an older one (cp310-abi3). Names are name-version[-build]-python-abi-platform.whl (PEP 427)."""
    python, abi = file[: -len(".whl")].split("-")[-3:-1]
    compiled = [int(tag[2:]) for tag in python.split(".") if tag.startswith("cp")]
    here = int(python_tag(version)[2:])
    if not compiled:
        return True
    return here in compiled or ("abi3" in abi.split(".") and min(compiled) <= here)


def check_interpreter(wheel_dir: str) -> dict:
    """Step 1: the manifest's interpreter is this one, and no wheel is compiled for another."""
    path = os.path.join(wheel_dir, MANIFEST)
    if not os.path.isfile(path):
        raise EnvironmentProblem(f"{path} is missing: run `scripts/device_setup.py download --wheel_dir {wheel_dir}`")
    with open(path) as handle:
        manifest = json.load(handle)
    wanted, here = manifest["python"], running_python()
    if wanted != here:
        raise EnvironmentProblem(
            f"the wheels in {wheel_dir} are for Python {wanted} ({python_tag(wanted)}) and {sys.executable} is "
            f"Python {here} ({python_tag(here)}): run it with Python {wanted}, or download again with "
            f"--python_version {here}"
        )
    for files in wheel_files(wheel_dir).values():
        for file in files:
            if not loads_on(file, here):
                raise EnvironmentProblem(f"{file} is not built for {python_tag(here)}: download it again")
    return manifest


def check_wheel_dir(wheel_dir: str, wheels: tuple) -> list[str]:
    """Step 2: each listed wheel once, at its version; the files to install."""
    found, files = wheel_files(wheel_dir), []
    for item in wheels:
        name, version = name_version(item)
        present = found.get(normalized(name), [])
        if len(present) > 1:
            raise EnvironmentProblem(
                f"{wheel_dir} holds {len(present)} wheels of {name} ({', '.join(present)}): keep one"
            )
        if not present or present[0].split("-")[1] != version:
            have = f" (it holds {present[0]})" if present else ""
            raise EnvironmentProblem(f"{wheel_dir} lacks the wheel {item}{have}: run `device_setup.py download` again")
        files.append(os.path.join(wheel_dir, present[0]))
    return files


def install(files: list[str], target: str) -> None:
    """Step 3: pip, into `target`, from the files alone."""
    os.makedirs(target, exist_ok=True)
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    command += ["--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target", target, *files]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        last = (completed.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise EnvironmentProblem(f"pip could not install the wheels into {target}: {last}")


def unmet_requirement(item: str) -> str | None:
    """What the installed distribution `item` (name==version) requires and the path lacks, or None."""
    from importlib import metadata

    from packaging.requirements import Requirement

    name, version = name_version(item)
    for text in metadata.requires(name) or []:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            found = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            return f"{name} {version} requires {text}, which is not installed: add its wheel"
        if not requirement.specifier.contains(found, prereleases=True):
            return f"{name} {version} requires {text} and {found} is installed: add a wheel that fits"
    return None


def import_check(required, optional, carried, carried_optional=()) -> int:
    """Step 4, in the fresh interpreter: import `required` ((module, distribution) pairs) in order, check the
    carried wheels' Requires-Dist, import `optional` and check the optional wheels' (reported, not fatal). Prints
    one JSON line; 0, or 1 at the first failure."""
    report = {"imported": [], "optional": {}}

    def fail(message: str) -> int:
        report["error"] = message
        print(json.dumps(report), flush=True)
        return 1

    start = time.perf_counter()
    for module, distribution in required:
        try:
            importlib.import_module(module)
        except BaseException as error:  # any failure of an import is this step's to report
            wheel = wheel_for(distribution, carried)
            return fail(f"cannot import {module} ({type(error).__name__}: {str(error)[:160]}): add {wheel}'s wheel")
        report["imported"].append(module)
    report["import_seconds"] = round(time.perf_counter() - start, 1)
    for item in carried:
        unmet = unmet_requirement(item)
        if unmet:
            return fail(unmet)
    for module, distribution in optional:
        try:
            importlib.import_module(module)
            report["optional"][module] = "ok"
        except BaseException as error:  # optional: reported
            report["optional"][module] = f"not available ({distribution}; {type(error).__name__}: {str(error)[:100]})"
    unmet = [unmet_requirement(item) for item in carried_optional]
    report["optional_requirements"] = [message for message in unmet if message]
    print(json.dumps(report), flush=True)
    return 0


def run_import_check(target, src, required, optional, carried, carried_optional=()) -> dict:
    """Run `import_check` in a fresh interpreter with `target` and `src` first on its path."""
    code = (
        "import json, sys; from starcoder2_train.benchmarking.device_env import import_check; "
        "sys.exit(import_check(*json.loads(sys.argv[1])))"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([target, src, os.environ.get("PYTHONPATH", "")]).rstrip(":"))
    payload = json.dumps([required, optional, carried, carried_optional])
    completed = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True, env=env)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (completed.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise EnvironmentProblem(f"the import check ended with exit {completed.returncode}: {tail}")
    report = json.loads(lines[-1])
    if completed.returncode != 0:
        raise EnvironmentProblem(report.get("error", f"the import check ended with exit {completed.returncode}"))
    return report


def remove_distribution(target: str, name: str) -> bool:
    """Delete what pip installed for distribution `name` under `target`: the top-level folders and files its
    dist-info's RECORD names (with the __pycache__ an import left), except bin/, which distributions share."""
    import shutil

    infos = [entry for entry in os.listdir(target) if entry.endswith(".dist-info")]
    infos = [entry for entry in infos if normalized(entry[: -len(".dist-info")].rsplit("-", 1)[0]) == normalized(name)]
    for info in infos:
        with open(os.path.join(target, info, "RECORD")) as handle:
            tops = {line.split(",")[0].split("/")[0] for line in handle if line.strip()}
        for top in sorted(tops - {"bin", "..", ""}):
            path = os.path.join(target, top)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.isfile(path):
                os.remove(path)
    return bool(infos)


def prepare(
    wheel_dir: str,
    target: str,
    src: str,
    wheels: tuple = WHEELS,
    optional_wheels: tuple = OPTIONAL_WHEELS,
    required: tuple = REQUIRED,
    optional: tuple = OPTIONAL,
) -> int:
    """The environment step (see the module's docstring): 0 and a summary line, or 1 and the line that says
    what to fix."""
    start = time.perf_counter()
    try:
        check_interpreter(wheel_dir)
        files = check_wheel_dir(wheel_dir, wheels)
        present = wheel_files(wheel_dir)
        carried_optional = tuple(item for item in optional_wheels if normalized(name_version(item)[0]) in present)
        files += check_wheel_dir(wheel_dir, carried_optional)
        install(files, target)
        installed = time.perf_counter() - start
        optional_report = run_import_check(target, src, (), optional, (), carried_optional)
        for (module, distribution), status in zip(optional, optional_report["optional"].values()):
            if status != "ok" and remove_distribution(target, distribution):
                optional_report["optional"][module] = f"{status}: removed from {target}"
        report = run_import_check(target, src, required, (), wheels)
        report.update(optional=optional_report["optional"])
        report["optional_requirements"] = optional_report["optional_requirements"]
    except EnvironmentProblem as error:
        print(f"{PREFIX} {error}", flush=True)
        return 1
    optional_status = ", ".join(f"{module} {status}" for module, status in report["optional"].items())
    optional_status += "".join(f"; {message}" for message in report.get("optional_requirements", []))
    print(
        f"{PREFIX} Python {running_python()} ({sys.executable}); {len(files)} wheels installed into {target} in "
        f"{installed:.1f} s; {len(report['imported'])} modules imported in {report['import_seconds']} s; "
        f"Requires-Dist met; optional: {optional_status or 'none'}; {time.perf_counter() - start:.1f} s in all",
        flush=True,
    )
    return 0


def download(wheel_dir: str, python_version: str = IMAGE_PYTHON, optional: bool = True) -> list[str]:
    """Here: the wheels for `python_version` on manylinux x86-64, deepspeed built from its sdist, the manifest."""
    os.makedirs(wheel_dir, exist_ok=True)
    wanted = [item for item in (*WHEELS, *(OPTIONAL_WHEELS if optional else ())) if name_version(item)[0] not in BUILT]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", python_version, "--implementation", "cp", "-d", wheel_dir]
    command += [word for platform in PLATFORMS for word in ("--platform", platform)]
    subprocess.run([*command, *wanted], check=True)
    built = [item for item in WHEELS if name_version(item)[0] in BUILT]
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheel_dir]
    subprocess.run([*build, *built], check=True, env=dict(os.environ, DS_BUILD_OPS="0"))
    listed = [*WHEELS, *(OPTIONAL_WHEELS if optional else ())]
    with open(os.path.join(wheel_dir, MANIFEST), "w") as handle:
        json.dump({"python": python_version, "platforms": list(PLATFORMS), "wheels": listed}, handle, indent=1)
    return listed
