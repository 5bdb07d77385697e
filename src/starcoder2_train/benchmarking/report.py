"""The printed tables: the training benchmark's (`print_table`), the device check's (`print_summary`) and the
data benchmark's sections. They read the same dicts the JSON files hold, so what is printed is what is kept.
"""

TRAINING_COLUMNS = (
    ("useful tok/s (median)", "real_tokens_per_second_per_device", "{:,.0f}"),
    ("min-max", None, None),
    ("MFU causal", "mfu_causal_at_seq_length", "{:.1%}"),
    ("MFU PaLM", "mfu_palm", "{:.1%}"),
    ("HW TFLOP/s", "hardware_tflops", "{:.4g}"),
    ("peak GB", "peak_memory_gb", "{:.1f}"),
    ("data wait", "data_wait_share", "{:.1%}"),
    ("GPU idle", "gpu_idle_share", "{:.1%}"),
    ("s/step", "seconds_per_step", "{:.3f}"),
)


def _cells(result: dict) -> list[str]:
    cells = []
    for _, key, fmt in TRAINING_COLUMNS:
        if key is None:  # the min-max of useful tokens/s over the repeats
            low, high = result.get(f"{TRAINING_COLUMNS[0][1]}_min"), result.get(f"{TRAINING_COLUMNS[0][1]}_max")
            cells.append(f"{low:,.0f}-{high:,.0f}" if low is not None else "-")
        else:
            cells.append(fmt.format(result[key]) if result.get(key) is not None else "-")
    return cells


def print_ratios(ratios: dict, indent: str = "") -> None:
    for name, value in ratios.items():
        if name not in ("best_baseline", "vs_best_baseline"):
            print(f"{indent}useful tokens/s, ours / {name}: {value:.2f}x")
    if "vs_best_baseline" in ratios:
        print(f"{indent}ours / best baseline ({ratios['best_baseline']}): {ratios['vs_best_baseline']:.2f}x")


def print_table(report: dict) -> None:
    """benchmark.py's report: one row per path (median over its processes), then the ratios, the profile's
    split of device time, the GEMM ceiling and the loss differences of the variants."""
    print(
        f"\n{report['label']}: {report.get('model')} at seq_length {report.get('seq_length')}, {report.get('machine')}"
    )
    print(f"{'path':12}" + "".join(f"{title:>22}" for title, _, _ in TRAINING_COLUMNS))
    for path, result in report["results"].items():
        if "error" in result:
            print(f"{path:12}  {result['error'][:150]}")
            continue
        print(f"{path:12}" + "".join(f"{cell:>22}" for cell in _cells(result)))
    print_ratios(report.get("useful_tokens_per_second_ratio") or {})
    profile = (report.get("profile") or {}).get("profile")
    if profile:
        shares = ", ".join(f"{kind} {share:.1%}" for kind, share in profile["share_of_wall"].items())
        print(f"profile of ours ({profile['steps']} steps, {profile['device']}): {shares}")
    elif report.get("profile"):
        print(f"profile of ours: {report['profile'].get('error')}")
    gemm = report.get("gemm") or {}
    if gemm.get("ceiling_tflops"):
        print(f"GEMM ceiling at {gemm['tokens']} tokens ({gemm['dtype']}): {gemm['ceiling_tflops']:.4g} TFLOP/s")
    for name, difference in (report.get("loss_difference") or {}).items():
        if difference:
            print(
                f"loss {name} - ours over {difference['steps']} micro batches: mean |diff| "
                f"{difference['mean_abs']:.4g}, max {difference['max_abs']:.4g}, last {difference['last']:+.4g}"
            )


def print_kernels(summary: dict) -> None:
    for entry in (summary.get("attention_kernels") or {}).get("kernels", []):
        label = f"  attention {entry['kernel']:34} s={entry['seq_length']:6}"
        if "error" in entry or "status" in entry:
            print(f"{label}  {entry.get('error', entry.get('status'))[:90]}")
            continue
        dropout = entry.get("dropout_forward_backward_ms")
        print(
            f"{label}  {entry['forward_backward_ms']:8.2f} ms fwd+bwd"
            f"{f' ({dropout:.2f} with dropout)' if dropout else '':24} correct={entry.get('correct', 'reference')}"
        )
    for entry in (summary.get("loss_kernels") or {}).get("kernels", []):
        label = f"  loss {entry['kernel']:20} tokens={entry['tokens']:6}"
        if "error" in entry or "status" in entry:
            print(f"{label}  {entry.get('error', entry.get('status'))[:90]}")
            continue
        memory = entry.get("peak_extra_memory_gb")
        print(
            f"{label}  {entry['forward_backward_ms']:8.2f} ms fwd+bwd  "
            f"{f'{memory:.2f} GB' if memory is not None else '-':>9}  correct={entry['correct']}  "
            f"errors {', '.join(f'{e:.1e}' for e in entry['relative_error_loss_dh_dw'])}"
        )
    gemm = summary.get("gemm") or {}
    if gemm.get("ceiling_tflops"):
        print(f"  GEMM ceiling at {gemm['tokens']} tokens ({gemm['dtype']}): {gemm['ceiling_tflops']:.4g} TFLOP/s")


def print_summary(summary: dict) -> None:
    """device_check.py's summary: the kernels, then one row per step and path, ratios, profile, float8."""
    timing = summary.get("timing", {})
    print(
        f"\n==== device check: {summary.get('seconds')} s of {summary.get('budget_seconds')}; attention used: "
        f"{summary.get('chosen_attention')}; timing per path: {timing} (shorter than a full benchmark)"
    )
    print_kernels(summary)
    print(f"  {'step':16}{'path':16}" + "".join(f"{title:>22}" for title, _, _ in TRAINING_COLUMNS))
    for step in summary["steps"]:
        if "skipped" in step:
            kind = "optional, " if step.get("optional") else ""
            print(f"  {step['label']:16}skipped ({kind}{step['skipped']})")
            continue
        for path, result in (step.get("results") or {}).items():
            if "error" in result:
                print(f"  {step['label']:16}{path:16}{result['error'][:120]}")
                continue
            print(f"  {step['label']:16}{path:16}" + "".join(f"{cell:>22}" for cell in _cells(result)))
        print_ratios(step.get("useful_tokens_per_second_ratio") or {}, indent=f"  {step['label']:16}")
        profile = (step.get("profile") or {}).get("profile")
        if profile:
            shares = ", ".join(f"{kind} {share:.1%}" for kind, share in profile["share_of_wall"].items())
            print(f"  {step['label']:16}device time: {shares}")
        for name, difference in (step.get("loss_difference") or {}).items():
            if difference:
                print(
                    f"  {step['label']:16}loss {name} - ours: mean |diff| {difference['mean_abs']:.4g}, "
                    f"last {difference['last']:+.4g} over {difference['steps']} micro batches"
                )
        if not step.get("results") and not step.get("profile"):
            print(f"  {step['label']:16}{step.get('error', step.get('status'))}")
    for case, figures in (summary.get("ratios") or {}).items():
        print_ratios(figures, indent=f"  {case + ' (all)':16}")


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
