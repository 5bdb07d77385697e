"""The held-out evaluation's time and memory per rank with 1 and 2 ranks, before and after the bounded set.

    python scripts/benchmark_eval.py [--output DIR] [--repositories N] [--tokens_per_language T] [--fim_problems P]

Before: every rank tokenizes every held-out file into Python lists and scores all of it. Split: the set of
evaluation/held_out_set.py holding every file, built once, memory-mapped and split across the ranks. After: the
same bounded (T tokens per language drawn by seed, P FIM problems).
One JSON line per (mode, ranks): build_s, score_s, rss_growth_mb (max over ranks), tokens scored, FIM problems
(starcoder2_train.benchmarking.evaluation).
"""

import tempfile

from starcoder2_train.benchmarking.evaluation import run_benchmark
from starcoder2_train.cli import ScriptParser, run_script


def parse_args(argv):
    parser = ScriptParser(description=__doc__)
    parser.add_argument("--output", help="Working folder (default: a temporary one).")
    parser.add_argument("--repositories", type=int, default=2000, help="Synthetic held-out repositories.")
    parser.add_argument("--tokens_per_language", type=int, default=20000, help="The after mode's bound.")
    parser.add_argument("--fim_problems", type=int, default=64, help="FIM problems in every mode.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    root = args.output or tempfile.mkdtemp(prefix="benchmark_eval-")
    return run_benchmark(root, args.repositories, args.tokens_per_language, args.fim_problems)


if __name__ == "__main__":
    run_script(main)
