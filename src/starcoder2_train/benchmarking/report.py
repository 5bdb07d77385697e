"""The printed tables: the training benchmark's (`print_table`), the device check's (`print_summary`) and the
data benchmark's sections. They read the same dicts the JSON files hold, so what is printed is what is kept.
"""

TRAINING_COLUMNS = (
    ("tokens/s/dev", "tokens_per_second_per_device", "{:,.0f}"),
    ("useful tok/s/dev", "real_tokens_per_second_per_device", "{:,.0f}"),
    ("TFLOP/s/dev", "tflops_per_device_causal", "{:.4g}"),
    ("MFU causal", "mfu_causal", "{:.1%}"),
    ("peak GB", "peak_memory_gb", "{:.1f}"),
    ("data wait", "data_wait_share", "{:.1%}"),
    ("s/step", "seconds_per_step", "{:.3f}"),
)


def print_table(report: dict) -> None:
    """benchmark.py's report: one row per path, then the ratio of useful tokens/s."""
    print(f"\n{report['label']}: {report['model']} at seq_length {report['seq_length']}, {report['machine']}")
    print(f"{'path':8}" + "".join(f"{title:>18}" for title, _, _ in TRAINING_COLUMNS))
    for path, result in report["results"].items():
        if "error" in result:
            print(f"{path:8}  {result['error'][:120]}")
            continue
        cells = [(fmt.format(result[key]) if result.get(key) is not None else "-") for _, key, fmt in TRAINING_COLUMNS]
        print(f"{path:8}" + "".join(f"{cell:>18}" for cell in cells))
    if report.get("useful_tokens_per_second_ratio"):
        print(f"useful tokens/s, ours / plain: {report['useful_tokens_per_second_ratio']:.2f}x")


def print_summary(summary: dict) -> None:
    """device_check.py's summary: the attention kernels, then one row per case and path."""
    print(f"\n==== device check: {summary['seconds']} s; attention used: {summary['chosen_attention']}")
    for entry in summary["attention_kernels"]:
        if "error" in entry:
            print(f"  kernel {entry['kernel']:34} s={entry['seq_length']:6}  {entry['error'][:90]}")
        else:
            print(
                f"  kernel {entry['kernel']:34} s={entry['seq_length']:6}  {entry['forward_backward_ms']:8.2f} ms "
                f"fwd+bwd  {entry.get('attention_tflops', 0):8.3g} TFLOP/s  "
                f"correct={entry.get('correct', 'reference')}"
            )
    header = f"  {'case':22}{'path':32}{'useful tok/s/dev':>18}{'MFU causal':>12}{'peak GB':>9}{'data wait':>10}"
    print(header)
    for step in summary["steps"]:
        if "skipped" in step:
            print(f"  {step['label']:22}skipped: {step['skipped']}")
            continue
        for path, result in step.get("results", {}).items():
            if "error" in result:
                print(f"  {step['label']:22}{path:32}{result['error'][:70]}")
                continue
            mfu = result.get("mfu_causal")
            print(
                f"  {step['label']:22}{path:32}{result.get('real_tokens_per_second_per_device', 0):>18,.0f}"
                f"{(f'{mfu:.1%}' if mfu is not None else '-'):>12}{result.get('peak_memory_gb', 0):>9.1f}"
                f"{result.get('data_wait_share', 0):>10.1%}"
            )
        if step.get("useful_tokens_per_second_ratio"):
            ratio = step["useful_tokens_per_second_ratio"]
            print(f"  {step['label']:22}{'ours / plain, useful tokens/s':32}{ratio:>17.2f}x")
        if not step.get("results"):
            print(f"  {step['label']:22}{step.get('error', step.get('status'))}")


def print_tokenization(figures: dict) -> None:
    """Section 1 of the data benchmark (`data_pipeline.tokenization`)."""
    ingest, raw, pipeline, no_fim = (
        figures[key] for key in ("ingest", "raw_encode_batch", "pipeline", "pipeline_fim_off")
    )
    fim = f"FIM {figures['fim_rate']:g}"
    print("\n1. ingest + examples + FIM + tokenize (one core)")
    print(
        f"   ingest of the stdlib: {ingest['megabytes']:.1f} MB in {ingest['seconds']:.2f} s = "
        f"{ingest['megabytes_per_second']:.1f} MB/s"
    )
    print(
        f"   tokenizers encode_batch (raw): {raw['megabytes_per_second']:.2f} MB/s, "
        f"{raw['tokens_per_second']:,.0f} tokens/s"
    )
    label = f"pipeline, {fim}:"
    print(f"   {label:31}{pipeline['megabytes_per_second']:.2f} MB/s, {pipeline['tokens_per_second']:,.0f} tokens/s")
    print(f"   {'pipeline, FIM off:':31}{no_fim['megabytes_per_second']:.2f} MB/s")
    print(
        f"   pipeline time / raw time: {pipeline['time_over_raw']:.3f} ({fim}), "
        f"{no_fim['time_over_raw']:.3f} (FIM off)  [goal: <= 1.10]"
    )


def print_pack_and_collate(figures: dict) -> None:
    """Section 2 of the data benchmark (`data_pipeline.pack_and_collate`)."""
    print(
        f"\n2. pack + collate, one data-loader worker (seq_length {figures['seq_length']}, "
        f"batches of {figures['batch_size']}, shuffled windows)"
    )
    print(
        f"   {figures['tokens_per_second']:,.0f} tokens/s = {figures['times_one_h100']:.0f}x one H100 training "
        f"StarCoder2-3B (~{figures['h100_tokens_per_second']:,} tokens/s)  [goal: >= 20x]"
    )


def print_packing_efficiency(figures: list[dict]) -> None:
    """Section 3 of the data benchmark (`data_pipeline.packing_efficiency`)."""
    print("\n3. packing efficiency (real tokens / all tokens) and tokens dropped")
    for entry in figures:
        line = (
            f"   seq_length {entry['seq_length']:>5}: this project {100 * entry['this_project']:.3f}%, "
            f"{entry['this_project_tokens_dropped']} tokens dropped"
        )
        if "trl_bfd" in entry:
            dropped = entry["trl_bfd_tokens_dropped"]
            line += (
                f"; TRL bfd {100 * entry['trl_bfd']:.3f}% of {entry['trl_bfd_rows']:,} rows, "
                f"{dropped:,} tokens dropped ({100 * entry['trl_bfd_share_dropped']:.1f}%)"
            )
        print(line)
