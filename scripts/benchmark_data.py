"""Data pipeline throughput and packing efficiency, beside the raw baselines, in one run.

    RAYON_NUM_THREADS=1 python scripts/benchmark_data.py [--output DIR] [--json PATH]

On the standard library of this Python (ingested here, test suites included):
1. ingest + examples + FIM + tokenize, MB/s and tokens/s on one core, next to `tokenizers`' own
   `encode_batch` over the same file contents: the pipeline's overhead over raw tokenization;
2. pack + collate throughput of one data-loader worker on the tokenized rows, as a multiple of the
   ~20,000 tokens/s one H100 consumes training StarCoder2-3B;
3. packing efficiency at seq_length 4096 and 16384: this project (nothing dropped) beside TRL's
   best-fit-decreasing packing (`trl.pack_dataset`, strategy "bfd") on the same token rows.
`--download N_BLOBS` runs the download benchmark instead: N_BLOBS synthetic gzip blobs served by moto's S3
server on loopback, fetched by data/download with 1 and 4 workers (blobs/s, per worker, MB/s; in
starcoder2_train.benchmarking.download).
`--scale_tokens N [--seq_length S] [--vocab_size V] [--num_windows W]` runs the token-store benchmark instead:
N synthetic tokens written to DIR/token_store with the project's writer, opened as training opens them, W
shuffled windows read; its last line is the figures as JSON (starcoder2_train.benchmarking.token_store).
`--assembly N [--index_records R] [--seq_length S] [--num_windows W]` runs the stored-once benchmark instead: N
synthetic repositories as a piece store against five per-epoch copies (bytes a token), the per-epoch index of R
records (seconds, bytes, at 20M repositories), shuffled windows a second read-time against a TokenStore;
`--prepare_memory MB` the peak memory of a prepare task on a MB repository, today's path and stored once
(starcoder2_train.benchmarking.assembly).
`--restarts FIRST,SECOND [--model_config test] [--seq_length S] [--batch_size B] [--repeats R]` runs the restart
benchmark instead: training saves a checkpoint every FIRST steps up to SECOND, then restarts from checkpoints
FIRST and SECOND are timed from the command's start to the first new step, this project's run_pretrain.py beside
the plain Trainer resuming a streamed dataset (starcoder2_train.benchmarking.resume).
`--mixture N [--weights 0.6,0.3,0.1]` runs the mixture benchmark instead: N windows of a weighted mixture of
synthetic sources, realised shares beside the weights, each rank's windows disjoint, the same windows for 1, 2 and
4 ranks x 0-2 loader workers (starcoder2_train.benchmarking.mixture).
Set RAYON_NUM_THREADS=1 so that the Rust tokenizer uses one core, as the per-core figures assume.
`--json PATH` writes the figures there, with the commit, date and command that produced them.
The measurements are in starcoder2_train.benchmarking.data_pipeline.
"""

import json
import os
import sys
import tempfile

from starcoder2_train.cli import ScriptParser


def parse_args(argv):
    parser = ScriptParser(description=__doc__)
    parser.add_argument("--output", default=None, help="Working directory (default: a temporary one).")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--json", default=None, help="Write the figures, with their provenance, to this JSON file.")
    parser.add_argument("--download", type=int, default=None, metavar="N_BLOBS", help="Benchmark the download.")
    parser.add_argument("--scale_tokens", type=int, default=None, metavar="N", help="Benchmark the token store.")
    parser.add_argument("--seq_length", type=int, default=4096, help="Window length (token-store benchmark).")
    parser.add_argument("--num_windows", type=int, default=2000, help="Windows read (token-store benchmark).")
    parser.add_argument(
        "--assembly", type=int, default=None, metavar="N", help="Benchmark tokens stored once (N repositories)."
    )
    parser.add_argument("--index_records", type=int, default=2_000_000, help="Records of the index benchmark.")
    parser.add_argument("--prepare_memory", type=int, default=None, metavar="MB", help="Prepare a MB repository.")
    parser.add_argument("--restarts", default=None, metavar="FIRST,SECOND", help="Benchmark restarts at 2 steps.")
    parser.add_argument("--model_config", default="test", help="Model preset (restart benchmark).")
    parser.add_argument("--batch_size", type=int, default=8, help="Windows per step (restart benchmark).")
    parser.add_argument("--repeats", type=int, default=3, help="Restarts per point and side (restart benchmark).")
    parser.add_argument("--mixture", type=int, default=None, metavar="N", help="Benchmark a mixture of N windows.")
    parser.add_argument("--weights", default="0.6,0.3,0.1", help="The sources' weights (mixture benchmark).")
    return parser.parse_args(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # Read when the datasets library is imported, so set before the package's modules are.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from starcoder2_train.benchmarking import data_pipeline, report
    from starcoder2_train.benchmarking.provenance import run_record, write_json
    from starcoder2_train.data.special_tokens import SpecialTokenIds

    if args.download is not None:
        from starcoder2_train.benchmarking.download import download_throughput, print_download

        record = run_record(argv, __file__, packages=("boto3", "moto"))
        figures = {**record, "download": download_throughput(args.download, args.output)}
        print_download(figures["download"])
        if args.json:
            write_json(args.json, figures)
        return figures
    if args.mixture is not None:
        from starcoder2_train.benchmarking.mixture import mixture_benchmark, print_mixture

        weights = [float(word) for word in args.weights.split(",")]
        figures = {
            **run_record(argv, __file__, packages=("torch", "accelerate")),
            **mixture_benchmark(args.mixture, weights),
        }
        print_mixture(figures)
        if args.json:
            write_json(args.json, figures)
        return figures
    if args.assembly is not None or args.prepare_memory is not None:
        from starcoder2_train.benchmarking import assembly

        record = run_record(argv, __file__, packages=("numpy", "tokenizers", "datatrove"))
        if args.assembly is not None:
            figures = {
                **record,
                **assembly.assembly_benchmark(
                    args.output, args.assembly, args.index_records, args.seq_length, args.num_windows
                ),
            }
            assembly.print_assembly(figures)
        else:
            figures = {**record, **assembly.prepare_memory(args.output, args.prepare_memory)}
            print(json.dumps(figures))
        if args.json:
            write_json(args.json, figures)
        return figures
    if args.restarts is not None:
        from starcoder2_train.benchmarking.resume import measure_restarts, print_restarts

        args.first_point, args.second_point = (int(word) for word in args.restarts.split(","))
        args.work = args.output or tempfile.mkdtemp(prefix="benchmark_restarts_")
        figures = {**run_record(argv, __file__, packages=("datasets", "accelerate")), **measure_restarts(args)}
        print_restarts(figures)
        if args.json:
            write_json(args.json, figures)
        return figures
    if args.scale_tokens is not None:
        from starcoder2_train.benchmarking.token_store import print_token_store, token_store_at_scale

        record = run_record(argv, __file__, packages=("numpy",))
        work = args.output or tempfile.mkdtemp(prefix="benchmark_data_")
        scale = token_store_at_scale(work, args.scale_tokens, args.seq_length, args.vocab_size, args.num_windows)
        figures = {**record, **scale}
        if args.json:
            write_json(args.json, figures)
        print_token_store(figures)
        return figures
    record = run_record(argv, __file__, packages=("tokenizers", "datasets", "trl"))
    work = args.output or tempfile.mkdtemp(prefix="benchmark_data_")
    threads = os.environ.get("RAYON_NUM_THREADS", "unset")
    print(f"threads: RAYON_NUM_THREADS={threads}; python {sys.version.split()[0]}")

    tokenization, rows, tokenizer = data_pipeline.tokenization(work, args.vocab_size)
    report.print_tokenization(tokenization)
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    pack_and_collate = data_pipeline.pack_and_collate(rows, special)
    report.print_pack_and_collate(pack_and_collate)
    packing_efficiency = data_pipeline.packing_efficiency(rows, special)
    report.print_packing_efficiency(packing_efficiency)
    print(
        f"\n{tokenization['tokens']:,} tokens in {tokenization['repositories']:,} repositories; work directory {work}"
    )

    figures = {
        **record,
        "rayon_num_threads": threads,
        "work_directory": work,
        "tokenization": tokenization,
        "pack_and_collate": pack_and_collate,
        "packing_efficiency": packing_efficiency,
    }
    if args.json:
        write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
