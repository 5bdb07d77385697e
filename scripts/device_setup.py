"""The device check's environment step: download the wheels here, install and check them there, before any step.

    PYTHONPATH=src .venv/bin/python scripts/device_setup.py download --wheel_dir .whl
    PYTHONPATH=src python3 scripts/device_setup.py install --wheel_dir .whl --target /tmp/site

`download` needs the network (PyPI) and .venv's torch (deepspeed's wheel is built from its sdist); `install` runs
with the device image's python3 and stops with exit status 1 and one line at the first module that is missing or
broken. The wheels, the modules and the checks are listed in starcoder2_train/benchmarking/device_env.py.
"""

import os
import sys

from starcoder2_train.benchmarking import device_env
from starcoder2_train.cli import ScriptParser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv):
    parser = ScriptParser(description=__doc__)
    parser.add_argument("action", choices=("download", "install"))
    parser.add_argument("--wheel_dir", default=".whl", help="Where the wheels and their manifest are.")
    parser.add_argument("--target", default="/tmp/site", help="install: the folder pip installs into.")
    parser.add_argument(
        "--python_version",
        default=device_env.IMAGE_PYTHON,
        help="download: the interpreter the wheels are for (the device image's by default; the running one's "
        "for a rehearsal here).",
    )
    parser.add_flag("--no_optional", help="download: leave liger, cce and torchao out.")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.action == "download":
        listed = device_env.download(args.wheel_dir, args.python_version, optional=not args.no_optional)
        print(f"{len(listed)} wheels for Python {args.python_version} in {args.wheel_dir}")
        return 0
    return device_env.prepare(args.wheel_dir, args.target, os.path.join(ROOT, "src"))


if __name__ == "__main__":
    sys.exit(main())
