"""The held-out evaluation's time and memory per rank, with 1 and 2 ranks: before (every rank tokenizes every
held-out file into Python lists and scores all of it), split (evaluation/held_out_set.py with every file: built
once per machine, memory-mapped, its windows and FIM problems split across the ranks, sums reduced: the same tokens
as before) and after (the same, bounded to tokens_per_language).

`run_benchmark(output, repositories, tokens_per_language, fim_problems)` makes synthetic held-out repositories
(4 languages), a byte-level BPE tokenizer and the tiny `test` model, then launches `torch.distributed.run` with
1 and 2 processes (gloo, CPU) of `python -m starcoder2_train.benchmarking.evaluation` for each mode. Each rank
reports the seconds to build its inputs, the seconds to score, and its resident memory growth over the whole
(ru_maxrss after minus the RSS before: the inputs, the scoring's tensors); the rows are the maximum over ranks.
"""

import argparse
import json
import os
import random
import resource
import socket
import subprocess
import sys
import time

LANGUAGES = (("py", "Python"), ("c", "C"), ("js", "JavaScript"), ("rs", "Rust"))


def synthetic_repositories(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = ["return", "value", "index", "self", "items", "count", "for", "if", "else", "name", "data", "x", "y"]
    repositories = []
    for number in range(count):
        files = []
        for index in range(rng.randint(2, 8)):
            extension, language = rng.choice(LANGUAGES)
            lines = [" ".join(rng.choices(words, k=rng.randint(2, 10))) for _ in range(rng.randint(20, 120))]
            files.append(
                {"path": f"src/f{index}.{extension}", "content": "\n".join(lines) + "\n", "language": language}
            )
        repositories.append({"repo_name": f"owner/repo-{number}", "files": files})
    return repositories


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(arguments) -> None:
    """One rank: build the inputs the mode's way, score them, write its figures."""
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from starcoder2_train.configs import ModelArguments
    from starcoder2_train.evaluation import held_out
    from starcoder2_train.evaluation.fim import evaluate_fim
    from starcoder2_train.evaluation.loss import evaluate_loss
    from starcoder2_train.model.factory import create_model
    from starcoder2_train.training.distributed import close_process_group

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    with open(arguments.repositories) as handle:
        repositories = json.load(handle)
    tokenizer = AutoTokenizer.from_pretrained(arguments.tokenizer)
    torch.manual_seed(0)
    model = create_model(ModelArguments(model_config="test", torch_dtype="float32"), tokenizer=tokenizer).eval()
    before = rss_bytes()
    start = time.perf_counter()
    if arguments.mode == "before":  # today's: every rank, every file, Python lists, all scored by every rank
        rows, problems = held_out.task_inputs(repositories, tokenizer, ["loss", "fim"], seed=0)
        problems, share = problems[: arguments.fim_problems], {"rank": 0, "world_size": 1}
    else:
        rows, problems = held_out.bounded_task_inputs(
            repositories,
            tokenizer,
            ["loss", "fim"],
            cache_dir=arguments.cache,
            seed=0,
            tokens_per_language=0 if arguments.mode == "split" else arguments.tokens_per_language,
            max_fim_problems=arguments.fim_problems,
        )
        share = {"rank": rank, "world_size": world}
    dist.barrier()
    built = time.perf_counter() - start
    start = time.perf_counter()
    loss = evaluate_loss(model, rows, seq_length=256, batch_size=8, **share)
    fim = evaluate_fim(model, tokenizer, problems, batch_size=8, max_new_tokens=16, max_prompt_tokens=240, **share)
    dist.barrier()
    scored = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    figures = {"build_s": built, "score_s": scored, "rss_growth_mb": grown / 1e6, "tokens": loss["tokens"]}
    figures["fim_problems"] = fim["problems"]
    with open(f"{arguments.output}.{rank}", "w") as handle:
        json.dump(figures, handle)
    close_process_group(exit_code=0)


def launch(processes: int, mode: str, paths: dict, tokens_per_language: int, fim_problems: int) -> dict:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out = os.path.join(paths["root"], f"{mode}-{processes}")
    cache = os.path.join(paths["root"], f"cache-{mode}-{processes}")  # each launch builds its own set
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--master_port", str(port), "-m", "starcoder2_train.benchmarking.evaluation", "--worker"]
    command += ["--mode", mode, "--repositories", paths["repositories"], "--tokenizer", paths["tokenizer"]]
    command += ["--cache", cache, "--output", out]
    command += ["--tokens_per_language", str(tokens_per_language), "--fim_problems", str(fim_problems)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"benchmark_eval: {mode} with {processes} process(es) failed:\n{done.stderr[-3000:]}")
    ranks = [json.load(open(f"{out}.{rank}")) for rank in range(processes)]
    row = {key: max(rank[key] for rank in ranks) for key in ranks[0]}
    return {"mode": mode, "ranks": processes, **row}


def run_benchmark(root: str, repositories: int, tokens_per_language: int, fim_problems: int) -> list[dict]:
    from starcoder2_train.data.tokens.tokenizer import train_tokenizer

    os.makedirs(root, exist_ok=True)
    held_out = synthetic_repositories(repositories)
    paths = {"root": root, "repositories": os.path.join(root, "repositories.json")}
    with open(paths["repositories"], "w") as handle:
        json.dump(held_out, handle)
    paths["tokenizer"] = os.path.join(root, "tokenizer")
    texts = [file["content"] for repository in held_out[:200] for file in repository["files"]]
    train_tokenizer(iter(texts), vocab_size=600, output_dir=paths["tokenizer"])
    rows = []
    for mode in ("before", "split", "after"):
        for processes in (1, 2):
            rows.append(launch(processes, mode, paths, tokens_per_language, fim_problems))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    for key in ("mode", "repositories", "tokenizer", "cache", "output"):
        parser.add_argument(f"--{key}")
    parser.add_argument("--tokens_per_language", type=int)
    parser.add_argument("--fim_problems", type=int)
    worker(parser.parse_args(argv))


if __name__ == "__main__":
    main()
