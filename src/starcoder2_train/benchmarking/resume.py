"""Restart cost: seconds from starting a resumed run to its first new optimizer step, at two resume points, for
this project's resume beside the Trainer's default resume of a streamed dataset.

Both sides train the same tiny Starcoder2ForCausalLM (preset `test` unless given), the same batch of `seq_length`
windows, on the same data (the standard library of this Python, ingested here, and a BPE trained on it), and save
a checkpoint every `first_point` steps up to `second_point`; each restart is then the user's command with
`resume_from_checkpoint`, timed from the process's start to the Trainer's first loss line after the checkpoint's
step (`logging_steps: 1`), and killed there.

- ours: `scripts/run_pretrain.py` on a recipe; its windows are a map-style dataset read in order, so the
  Trainer skips the trained batches by index (accelerate's SkipBatchSampler) and reads none of them.
- baseline: what a transformers user streams at this scale (`datasets.load_dataset(..., streaming=True)`,
  tokenized in `.map` and packed into `seq_length` windows by a generator, as TRL's ConstantLengthDataset and the
  published StarCoder fine-tuning scripts do) with the plain `Trainer`, whose default resume
  (`ignore_data_skip: false`) iterates through every batch already trained on: it reads, tokenizes and packs
  them again. The baseline packs files one after another without FIM or repository context, which is less work
  per token than ours: it is favoured.

The baseline's restart grows with the resume step at the rate it re-reads; `seconds_per_skipped_step` and
`skipped_tokens_per_second` are that slope. Under accelerate's default dispatch of an iterable dataset, rank 0
reads every global batch, so on a cluster that slope applies to the global batch of every step before the
checkpoint (StarCoder2-3B: 2.6M tokens a step).
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import datasets

from starcoder2_train.benchmarking.provenance import PROJECT_ROOT

FIRST_NEW_STEP = "'loss'"  # the Trainer's printed log dict of a step (disable_tqdm: true, logging_steps: 1)


def prepare_data(work: str, vocab_size: int) -> tuple[str, str]:
    """(shards, tokenizer) under `work`: the standard library ingested and a BPE trained on it, made once."""
    from starcoder2_train.data.sources.local.ingest import ingest
    from starcoder2_train.data.tokens.tokenizer import train_tokenizer_from_parquet

    shards, tokenizer = os.path.join(work, "stdlib"), os.path.join(work, "tokenizer")
    if not os.path.isfile(os.path.join(shards, "ingest_summary.json")):
        ingest([], shards, overwrite=True)
    if not os.path.isdir(tokenizer):
        train_tokenizer_from_parquet(shards, vocab_size, tokenizer)
    return shards, tokenizer


def settings(args, shards: str, tokenizer: str) -> dict:
    """The values both sides train with (the recipe of ours; the baseline's TrainingArguments)."""
    return dict(
        model_config=args.model_config,
        torch_dtype="float32",
        dataset_name_or_path=shards,
        tokenizer_name_or_path=tokenizer,
        seq_length=args.seq_length,
        eval_fraction=0.0,
        num_proc=1,
        max_steps=args.second_point + 5,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3,
        warmup_steps=10,
        logging_steps=1,
        save_strategy="steps",
        save_steps=args.first_point,
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=7,
        use_cpu=True,
    )


def ours_command(recipe: str, output_dir: str, resume: str | None) -> list[str]:
    command = [sys.executable, os.path.join(PROJECT_ROOT, "scripts", "run_pretrain.py"), recipe]
    command += ["--output_dir", output_dir]
    return command + (["--resume_from_checkpoint", resume] if resume else [])


def baseline_command(values_file: str, output_dir: str, resume: str | None) -> list[str]:
    command = [sys.executable, "-m", "starcoder2_train.benchmarking.resume", "--baseline_child", values_file]
    command += ["--output_dir", output_dir]
    return command + (["--resume_from_checkpoint", resume] if resume else [])


def run_until(command: list[str], stop_after_step: int | None, log_path: str) -> float:
    """Run `command`; with `stop_after_step`, kill it once the Trainer has logged that many new steps' losses.
    Returns the seconds from the start to the first new step's loss line (or to the exit)."""
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        first, seen = None, 0
        for line in process.stdout:
            log.write(line)
            if FIRST_NEW_STEP in line and line.lstrip().startswith("{"):
                seen += 1
                first = first or time.perf_counter() - start
                if stop_after_step is not None and seen >= stop_after_step:
                    os.killpg(process.pid, signal.SIGKILL)
                    break
        process.wait()
    if first is None:
        raise RuntimeError(f"{' '.join(command)} logged no step (exit {process.returncode}); see {log_path}")
    return first


def measure_restarts(args) -> dict:
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    shards, tokenizer = prepare_data(work, args.vocab_size)
    values = settings(args, shards, tokenizer)
    recipe, values_file = os.path.join(work, "recipe.yaml"), os.path.join(work, "baseline.json")
    with open(recipe, "w") as handle:
        handle.write("".join(f"{key}: {json.dumps(value)}\n" for key, value in values.items()))
    with open(values_file, "w") as handle:
        json.dump(values, handle)
    commands = {"ours": lambda *a: ours_command(recipe, *a), "baseline": lambda *a: baseline_command(values_file, *a)}
    results = {}
    for name, command in commands.items():
        output_dir = os.path.join(work, name)
        # Train to the second point; the loss line of the step after it comes after its checkpoint is complete.
        train_seconds = time.perf_counter()
        run_until(command(output_dir, None), args.second_point + 1, os.path.join(work, f"{name}-train.log"))
        results[name] = {"train_seconds": time.perf_counter() - train_seconds, "restarts": {}}
    for repeat in range(args.repeats):
        for point in (args.first_point, args.second_point):
            for name, command in commands.items():  # alternating, so that noise falls on both sides
                output_dir = os.path.join(work, name)
                checkpoint = os.path.join(output_dir, f"checkpoint-{point}")
                log_path = os.path.join(work, f"{name}-restart-{point}-{repeat}.log")
                seconds = run_until(command(output_dir, checkpoint), 1, log_path)
                results[name]["restarts"].setdefault(str(point), []).append(seconds)
    return summarise(results, args)


def summarise(results: dict, args) -> dict:
    tokens_per_step = args.batch_size * args.seq_length
    first, second = str(args.first_point), str(args.second_point)
    for figures in results.values():
        medians = {point: statistics.median(times) for point, times in figures["restarts"].items()}
        figures["median_seconds"] = medians
        slope = (medians[second] - medians[first]) / (args.second_point - args.first_point)
        figures["seconds_per_skipped_step"] = slope
        figures["skipped_tokens_per_second"] = tokens_per_step / slope if slope > 0 else None
    ours, baseline = results["ours"]["median_seconds"], results["baseline"]["median_seconds"]
    return {
        "settings": {key: getattr(args, key) for key in ("model_config", "seq_length", "batch_size", "repeats")},
        "tokens_per_step": tokens_per_step,
        "resume_points": [args.first_point, args.second_point],
        "results": results,
        "baseline_over_ours": {point: baseline[point] / ours[point] for point in ours},
    }


def print_restarts(figures: dict) -> None:
    points = figures["resume_points"]
    print(f"restart to the first new step, median of {figures['settings']['repeats']} (seconds):")
    print(f"{'':10s}" + "".join(f"{'step ' + str(p):>12s}" for p in points) + f"{'s/skipped step':>16s}")
    for name, result in figures["results"].items():
        row = "".join(f"{result['median_seconds'][str(p)]:12.2f}" for p in points)
        print(f"{name:10s}{row}{result['seconds_per_skipped_step']:16.4f}")
    ratios = ", ".join(f"step {p}: {r:.2f}" for p, r in figures["baseline_over_ours"].items())
    print(f"baseline / ours: {ratios}")


# The baseline, in a process of its own ---------------------------------------------------------------------------


def streamed_windows(shards: str, tokenizer, seq_length: int):
    """The baseline's data: the shards' files streamed, tokenized in datasets' `.map`, packed into windows."""
    import glob

    import torch

    files = sorted(glob.glob(os.path.join(shards, "**", "*.parquet"), recursive=True))
    stream = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        texts = [file["content"] for files in batch["files"] for file in files]
        return {"input_ids": [ids + [eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]}

    # A few repositories a batch (a shard row is a repository): the first window comes after a few files, not
    # after datasets' default of 1,000 rows, which is a whole shard here.
    tokenized = stream.map(tokenize, batched=True, batch_size=4, remove_columns=stream.column_names)

    class Windows(torch.utils.data.IterableDataset):
        def __iter__(self):
            buffer = []
            for row in tokenized:
                buffer.extend(row["input_ids"])
                while len(buffer) >= seq_length:
                    window, buffer = buffer[:seq_length], buffer[seq_length:]
                    yield {"input_ids": torch.tensor(window), "labels": torch.tensor(window)}

    return Windows()


def baseline_child(values_file: str, output_dir: str, resume: str | None) -> None:
    from transformers import Trainer, TrainingArguments

    from starcoder2_train.configs import ModelArguments
    from starcoder2_train.data.tokens.tokenizer import load_tokenizer
    from starcoder2_train.model.factory import create_model

    with open(values_file) as handle:
        values = json.load(handle)
    tokenizer = load_tokenizer(values["tokenizer_name_or_path"])
    model = create_model(
        ModelArguments(model_config=values["model_config"], torch_dtype="float32", attn_implementation="sdpa"),
        tokenizer=tokenizer,
    )
    names = set(TrainingArguments.__dataclass_fields__)
    training_args = TrainingArguments(output_dir=output_dir, **{k: v for k, v in values.items() if k in names})
    data = streamed_windows(values["dataset_name_or_path"], tokenizer, values["seq_length"])
    Trainer(model=model, args=training_args, train_dataset=data).train(resume_from_checkpoint=resume)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline_child", default=None)
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--resume_from_checkpoint", default=None)
    args = parser.parse_args(argv)
    baseline_child(args.baseline_child, args.output_dir, args.resume_from_checkpoint)


if __name__ == "__main__":
    main()
