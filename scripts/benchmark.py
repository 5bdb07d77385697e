"""Training throughput of this project's path, and of the plain path a user would otherwise write, on the same data.

    python scripts/benchmark.py --recipe recipes/tiny/pretrain.yaml --seq_length 4096 --baseline
    python scripts/benchmark.py --model_config starcoder2-3b --seq_length 16384 --token_file F.npz --baseline \
        --bf16 true --attn_implementation sdpa_varlen --loss_chunk_size 4096 --plain gradient_checkpointing=true

Each path trains `--warmup` steps, then `--steps` timed steps, with the Trainer, and reports tokens/s per device
(all and non-padding "useful" tokens), model TFLOP/s and MFU (causal convention, flops.py), peak memory and the
share of time spent waiting for data (callbacks.ThroughputCallback measures both paths alike).

- ours: the recipe as given (any `--key value` recipe override applies): packed windows with per-document
  positions, the recipe's attention, loss_chunk_size, checkpointing and compile keys.
- plain (`--baseline`): what one writes with transformers alone: one row per document, split into pieces of
  at most seq_length tokens (nothing dropped, as tokenizing with return_overflowing_tokens gives), rows in
  random order, padded to the longest row of the batch with an attention_mask, default attention (sdpa),
  transformers' own loss and default optimizer. It shares the model, seq_length, batch size, accumulation,
  precision and optimizer hyperparameters; `--plain key=value` overrides its TrainingArguments (for example
  gradient_checkpointing=true where it would not fit otherwise).

Data: the recipe's dataset through the project's pipeline (needs the datasets library), or `--token_file` (an
.npz written by `--save_token_file`: token rows without any preprocessing, so only torch and transformers are
needed), or `--synthetic N` documents of log-normal lengths. Results go to `--output` (JSON), by default
$OUT/benchmark-<label>.json when OUT is set; the table is printed last. An out-of-memory path is reported as
such and the other still runs.
"""

import argparse
import dataclasses
import gc
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback

import numpy as np
import pyarrow as pa
import torch
import transformers
from transformers import TrainerCallback, set_seed

from starcoder2_train.configs import PretrainingArguments, RecipeParser
from starcoder2_train.data.collators import make_collator
from starcoder2_train.data.packing import PackedDataset
from starcoder2_train.data.special_tokens import IGNORE_INDEX, SpecialTokenIds
from starcoder2_train.model.factory import choose_attention, create_model
from starcoder2_train.model.flops import model_flops_per_token
from starcoder2_train.model.presets import build_config
from starcoder2_train.training.throughput import ThroughputCallback
from starcoder2_train.training.trainer import PretrainingTrainer

# Training keys the plain path shares with ours: the same optimisation problem, batch and precision.
SHARED_KEYS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "bf16",
    "fp16",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "lr_scheduler_type",
    "warmup_steps",
    "seed",
    "dataloader_num_workers",
)
SYNTHETIC_SPECIAL = SpecialTokenIds(
    eos=0, fim_prefix=1, fim_middle=2, fim_suffix=3, fim_pad=4, repo_name=5, file_sep=6
)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="Recipe YAML; without it, give --model_config and --seq_length.")
    parser.add_argument("--steps", type=int, default=5, help="Timed optimizer steps per path.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed optimizer steps first (compilation, caches).")
    parser.add_argument("--baseline", action="store_true", help="Also measure the plain path, on the same data.")
    parser.add_argument("--only_baseline", action="store_true", help="Measure the plain path alone.")
    parser.add_argument(
        "--plain",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="TrainingArguments override for the plain path (repeatable).",
    )
    parser.add_argument("--token_file", help="Token rows from an .npz written by --save_token_file.")
    parser.add_argument("--synthetic", type=int, help="Use this many synthetic documents (log-normal lengths).")
    parser.add_argument("--save_token_file", help="Write the token rows used here to this .npz, for --token_file.")
    parser.add_argument(
        "--max_tokens", type=int, default=None, help="Use only the first documents, up to this many tokens."
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="Run each path this many times, alternating; report each one's best (shared machines).",
    )
    parser.add_argument("--label", default="benchmark", help="Name of this measurement in the output.")
    parser.add_argument("--output", help="Results JSON (default $OUT/benchmark-<label>.json if OUT is set).")
    return parser.parse_known_args(argv)


# ---- data --------------------------------------------------------------------------------------------------------


def synthetic_documents(count: int, vocab_size: int, seed: int = 0) -> list[np.ndarray]:
    """Documents with log-normal lengths (median 2,000 tokens, many short, a long tail) and random tokens."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=np.log(2000), sigma=1.2, size=count), 16, 200_000).astype(int)
    return [np.append(rng.integers(7, vocab_size, size=n - 1), 0) for n in lengths]  # ends in <|endoftext|>


def load_documents(args, model_args, data_args, training_args):
    """(documents as int arrays, SpecialTokenIds, vocabulary size needed, description of the data)."""
    if args.token_file:
        with np.load(args.token_file) as data:
            tokens, lengths, special = data["tokens"], data["lengths"], data["special"]
        documents = np.split(tokens.astype(np.int64), np.cumsum(lengths)[:-1])
        return documents, SpecialTokenIds(*special.tolist()), int(tokens.max()) + 1, f"token file {args.token_file}"
    if args.synthetic:
        vocab = 49152 if model_args.model_config and model_args.model_config.startswith("starcoder2") else 4096
        return (
            synthetic_documents(args.synthetic, vocab, training_args.seed),
            SYNTHETIC_SPECIAL,
            vocab,
            f"{args.synthetic} synthetic documents (log-normal lengths, median 2000 tokens)",
        )
    from starcoder2_train.data.pipeline import load_token_rows  # the datasets library, only for this source
    from starcoder2_train.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(data_args.tokenizer_name_or_path or model_args.model_name_or_path)
    rows, _ = load_token_rows(data_args, tokenizer, training_args.seed)
    documents = [np.asarray(ids, dtype=np.int64) for ids in rows["input_ids"]]
    return (
        documents,
        SpecialTokenIds.from_tokenizer(tokenizer),
        len(tokenizer),
        f"{data_args.dataset_name_or_path} through the project's pipeline ({len(documents)} repository examples)",
    )


def save_documents(path: str, documents, special: SpecialTokenIds) -> None:
    tokens = np.concatenate(documents)
    dtype = np.uint16 if tokens.max() < 2**16 else np.int32
    np.savez_compressed(
        path,
        tokens=tokens.astype(dtype),
        lengths=np.array([len(d) for d in documents]),
        special=np.array(dataclasses.astuple(special)),
    )


def describe(documents, seq_length: int) -> dict:
    lengths = np.array([len(d) for d in documents])
    return {
        "documents": len(lengths),
        "tokens": int(lengths.sum()),
        "length_percentiles_10_50_90": [int(v) for v in np.percentile(lengths, [10, 50, 90])],
        "share_of_documents_longer_than_seq_length": float((lengths > seq_length).mean()),
    }


class PlainRows(torch.utils.data.Dataset):
    """One row per document piece of at most seq_length tokens, in document order (the Trainer shuffles)."""

    def __init__(self, documents, seq_length: int):
        self.pieces = [d[i : i + seq_length] for d in documents for i in range(0, len(d), seq_length)]

    def __len__(self):
        return len(self.pieces)

    def __getitem__(self, index):
        return {"input_ids": self.pieces[index]}


class PadToLongest:
    """Right-pad to the batch's longest row; attention_mask 0 and labels -100 on the padding."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows):
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, : len(row["input_ids"])] = torch.as_tensor(row["input_ids"])
            attention_mask[index, : len(row["input_ids"])] = 1
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---- measurement -------------------------------------------------------------------------------------------------


class TimedSteps(TrainerCallback):
    """Discard the warm-up steps, then take the ThroughputCallback's figures over the timed steps."""

    def __init__(self, throughput: ThroughputCallback, warmup: int, steps: int):
        self.throughput, self.warmup, self.steps = throughput, warmup, steps
        self.figures, self.loss, self._start = None, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step not in (self.warmup, self.warmup + self.steps):
            return
        if args.device.type == "cuda":
            torch.cuda.synchronize(args.device)  # the device's queued work belongs to the steps before
        if state.global_step == self.warmup:
            self.throughput.measure()  # starts the timed interval
            self._start = time.perf_counter()
        else:
            self.figures = self.throughput.measure(args.world_size)
            self.figures["seconds_per_step"] = (time.perf_counter() - self._start) / self.steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = logs["loss"]


def run_path(name, model_args, config, attention, training_args, dataset, collator, args) -> dict:
    """Train warmup + steps optimizer steps; the timed figures, or the error that stopped the path."""
    set_seed(training_args.seed)
    throughput = ThroughputCallback(training_args.peak_flops)
    timer = TimedSteps(throughput, args.warmup, args.steps)
    model = trainer = None
    start = time.perf_counter()
    try:
        device = "cuda" if torch.cuda.is_available() and not training_args.use_cpu else "cpu"
        model = create_model(model_args, config, None, attention, device=device)
        trainer = PretrainingTrainer(
            model=model,
            args=training_args,
            train_dataset=dataset,
            data_collator=collator,
            callbacks=[throughput, timer],
        )
        trainer.train()
        result = dict(timer.figures or {"error": "the timed steps did not complete"}, final_loss=timer.loss)
    except torch.OutOfMemoryError as error:
        result = {"error": f"out of memory: {str(error).splitlines()[0]}"}
    except Exception as error:  # recorded, so that the other path and later cases still run
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    result.update(wall_seconds=round(time.perf_counter() - start, 1), attention=attention)
    if torch.cuda.is_available():
        result.setdefault("peak_memory_gb", torch.cuda.max_memory_allocated() / 1e9)
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(f"[{name}] {json.dumps(result)}", flush=True)
    return result


def plain_training_args(ours: PretrainingArguments, overrides: list[str], output_dir: str) -> PretrainingArguments:
    """transformers' defaults (random order, no fast-path key), the shared keys copied from ours, then --plain."""
    values = {key: getattr(ours, key) for key in SHARED_KEYS}
    for item in overrides:
        key, _, value = item.partition("=")
        values[key] = {"true": True, "false": False}.get(value.lower(), value)
        if isinstance(values[key], str) and value.startswith("{"):
            values[key] = json.loads(value)
    return PretrainingArguments(
        output_dir=output_dir,
        max_steps=ours.max_steps,
        logging_steps=ours.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=ours.use_cpu,
        peak_flops=ours.peak_flops,
        disable_tqdm=True,
        train_sampling_strategy="random",
        **values,
    )


# ---- main --------------------------------------------------------------------------------------------------------


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    processor = platform.processor() or platform.machine()
    return f"{processor}, {os.cpu_count()} CPU threads, torch threads {torch.get_num_threads()}"


def print_table(report: dict) -> None:
    columns = (
        ("tokens/s/dev", "tokens_per_second_per_device", "{:,.0f}"),
        ("useful tok/s/dev", "real_tokens_per_second_per_device", "{:,.0f}"),
        ("TFLOP/s/dev", "tflops_per_device_causal", "{:.4g}"),
        ("MFU causal", "mfu_causal", "{:.1%}"),
        ("peak GB", "peak_memory_gb", "{:.1f}"),
        ("data wait", "data_wait_share", "{:.1%}"),
        ("s/step", "seconds_per_step", "{:.3f}"),
    )
    print(f"\n{report['label']}: {report['model']} at seq_length {report['seq_length']}, {report['machine']}")
    print(f"{'path':8}" + "".join(f"{title:>18}" for title, _, _ in columns))
    for path, result in report["results"].items():
        if "error" in result:
            print(f"{path:8}  {result['error'][:120]}")
            continue
        cells = [(fmt.format(result[key]) if result.get(key) is not None else "-") for _, key, fmt in columns]
        print(f"{path:8}" + "".join(f"{cell:>18}" for cell in cells))
    if report.get("useful_tokens_per_second_ratio"):
        print(f"useful tokens/s, ours / plain: {report['useful_tokens_per_second_ratio']:.2f}x")


def main(argv=None):
    command_words = list(sys.argv[1:] if argv is None else argv)
    args, recipe_argv = parse_args(command_words)
    total_steps = args.warmup + args.steps
    output_dir = tempfile.mkdtemp(prefix="benchmark-")  # the Trainer's; nothing is saved there
    forced = [
        "--output_dir",
        output_dir,
        "--max_steps",
        str(total_steps),
        "--logging_steps",
        str(total_steps),
        "--save_strategy",
        "no",
        "--eval_strategy",
        "no",
        "--report_to",
        "none",
        "--push_to_hub",
        "false",
        "--disable_tqdm",
        "true",
    ]
    if args.recipe:
        words = [args.recipe, *recipe_argv, *forced]
    else:  # a named size: the data comes from --token_file or --synthetic
        words = ["--dataset_name_or_path", "(benchmark data)", *recipe_argv, *forced]
    model_args, data_args, training_args = RecipeParser().parse(words)
    if training_args.dataloader_num_workers:
        print("note: dataloader_num_workers is kept from the recipe for both paths", flush=True)

    documents, special, vocab_needed, source = load_documents(args, model_args, data_args, training_args)
    if args.max_tokens:
        keep = int(np.searchsorted(np.cumsum([len(d) for d in documents]), args.max_tokens)) + 1
        documents = documents[:keep]
    if args.save_token_file:
        save_documents(args.save_token_file, documents, special)
        print(f"wrote {len(documents)} documents to {args.save_token_file}", flush=True)
    config = build_config(model_args, vocab_needed)
    seq_length = data_args.seq_length
    attention = choose_attention(model_args.attn_implementation)

    report = {
        "label": args.label,
        "command": "python scripts/benchmark.py " + shlex.join(command_words),
        "machine": machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": model_args.model_config or model_args.model_name_or_path,
        "seq_length": seq_length,
        "micro_batch": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "bf16": training_args.bf16,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "flops_per_token_causal_at_seq_length": model_flops_per_token(config, seq_length),
        "data": {"source": source, **describe(documents, seq_length)},
        "results": {},
    }
    print(json.dumps({k: v for k, v in report.items() if k != "results"}), flush=True)

    paths = {}
    if not args.only_baseline:
        table = pa.table({"input_ids": pa.array([d.tolist() for d in documents], type=pa.list_(pa.int32()))})
        packed = PackedDataset(
            table,
            seq_length,
            special,
            cross_document_attention=data_args.cross_document_attention,
            shuffle_seed=training_args.seed,
        )
        collator = make_collator(attention)
        paths["ours"] = (model_args, attention, training_args, packed, collator)
        report["packing_efficiency"] = packed.efficiency
    if args.baseline or args.only_baseline:
        plain_model_args = dataclasses.replace(model_args, attn_implementation="sdpa")
        paths["plain"] = (
            plain_model_args,
            "sdpa",
            plain_training_args(training_args, args.plain, output_dir),
            PlainRows(documents, seq_length),
            PadToLongest(special.eos),
        )
    # On a shared machine other work steals time: alternate the paths and keep each one's best repeat.
    runs = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, (path_model_args, path_attention, path_args, dataset, path_collator) in paths.items():
            runs[name].append(
                run_path(name, path_model_args, config, path_attention, path_args, dataset, path_collator, args)
            )
    for name, results in runs.items():
        finished = [r for r in results if r.get("real_tokens_per_second_per_device")]
        best = max(finished, key=lambda r: r["real_tokens_per_second_per_device"]) if finished else results[-1]
        report["results"][name] = dict(best, repeats=len(results)) if args.repeats > 1 else best
        if args.repeats > 1:
            report.setdefault("all_repeats", {})[name] = results
    ours, plain = report["results"].get("ours", {}), report["results"].get("plain", {})
    if ours.get("real_tokens_per_second_per_device") and plain.get("real_tokens_per_second_per_device"):
        report["useful_tokens_per_second_ratio"] = (
            ours["real_tokens_per_second_per_device"] / plain["real_tokens_per_second_per_device"]
        )

    output = args.output
    if output is None and os.environ.get("OUT"):
        output = os.path.join(os.environ["OUT"], f"benchmark-{args.label}.json")
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as handle:
            json.dump(report, handle, indent=1)
    shutil.rmtree(output_dir, ignore_errors=True)
    print_table(report)
    return report


if __name__ == "__main__":
    main()
