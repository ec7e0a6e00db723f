"""The README's tables, made from ``bench_results/results.json``: ratios first, absolute numbers with the
machine named."""

from __future__ import annotations

from typing import Any

__all__ = ["markdown_tables"]


def _ratio(r: dict[str, float] | None) -> str:
    if not r:
        return "-"
    return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"


def _machine_line(machine: dict[str, Any]) -> str:
    where = machine.get("gpu") or f"{machine['cpu']['model']}, {machine['cpu_count']} cores"
    allocator = machine["allocator"]
    setting = ", ".join(f"{k}={v}" for k, v in allocator["malloc_env"].items()) or "glibc defaults"
    if allocator["ld_preload"]:
        setting += f", LD_PRELOAD={allocator['ld_preload']}"
    return (
        f"{where}; torch {machine['torch']}, MONAI {machine['monai']}, {machine['torch_threads']} threads, "
        f"allocator: {setting}; bf16 in hardware: {'yes' if machine['bf16_native'] else 'no'}"
    )


def step_table(results: dict[str, Any]) -> str:
    """One row per step case: speed-ups over the plain loop, over float32 and over the authors' step (median
    and range of the per-round ratios), then the absolute numbers; ``step GiB`` is the step's peak less what
    was in use before it."""
    lines = [
        "| config | case | vs plain loop | vs batched fp32 | vs authors | s / step | volumes / s "
        "| slices / s | peak GiB | step GiB | GFLOP / step | utilisation |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config, block in results["steps"].items():
        for case in block["cases"]:
            cells = [
                config, case["case"], _ratio(case.get("vs_plain")), _ratio(case.get("vs_fp32")),
                _ratio(case.get("vs_authors")), f"{case['median_s']:.3f}", f"{case['volumes_per_s']:.2f}",
                f"{case['slices_per_s']:.0f}", _gib(case.get("peak_gib")), _gib(case.get("step_gib")),
                f"{case['gflop']:.0f}", f"{100 * case['utilisation']:.0f} %",
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def loader_table(results: dict[str, Any]) -> str:
    """Loader throughput next to what the default step consumes."""
    block = results["loader"]
    consumed = block.get("step_consumes_volumes_per_s")  # absent when the demo step was not measured
    lines = [
        "| cache | workers | volumes / s | slices / s | over the step's consumption |",
        "|---|---|---|---|---|",
    ]
    for row in block["rows"]:
        over = f"{row['volumes_per_s'] / consumed:.1f}x" if consumed else "-"
        lines.append(
            f"| {row['cache']} | {row['workers']} | {row['volumes_per_s']:.2f} | {row['slices_per_s']:.0f} "
            f"| {over} |"
        )
    return "\n".join(lines)


def clustering_lines(results: dict[str, Any]) -> str:
    """k-means against faiss-cpu and Sinkhorn, one sentence each."""
    km, sk = results["kmeans"], results["sinkhorn"]
    head = f"spherical k-means, {km['n']:,} x {km['dim']} into {km['k']:,} clusters"
    head += f", {km['iterations']} iterations"
    if "faiss_over_ours" in km:
        ratio = km["faiss_over_ours"]
        text = f"- {head}: faiss-cpu time / ours {_ratio(ratio)} (above 1: ours is faster)"
    else:
        text = f"- {head}: faiss-cpu not installed, no comparison"
    sinkhorn = f"- Sinkhorn-Knopp, {sk['rows']} x {sk['k']}, {sk['iterations']} iterations"
    sinkhorn += f": {sk['median_ms']:.1f} ms"
    return text + "\n" + sinkhorn


def amp_table(results: dict[str, Any]) -> str:
    """Last-epoch losses of the real-data runs under float32 and bf16 autocast, with the gap in seed
    standard deviations."""
    check = results["amp_check"]
    lines = [
        f"Real-data runs: the demo, {check['epochs']} epochs, {check['seeds']} seeds per setting; "
        "last epoch, mean +/- standard deviation over seeds:",
        "",
        "| loss | float32 | bf16 autocast | gap | gap / float32 seed sd |",
        "|---|---|---|---|---|",
    ]
    for key, e in check["losses"].items():
        fp32 = f"{e['fp32_last_mean']:.3f} +/- {e['fp32_last_sd']:.3f}"
        bf16 = f"{e['bf16_last_mean']:.3f} +/- {e['bf16_last_sd']:.3f}"
        gap = f"{e['last_gap']:.3f} | {e['last_gap_over_seed_sd']:.2f}"
        lines.append(f"| {key} | {fp32} | {bf16} | {gap} |")
    return "\n".join(lines)


def largest_batch_lines(results: dict[str, Any]) -> str:
    """The largest default step per configuration on the GPU, and its memory per volume."""
    total = results["largest_batch_device_gib"]
    lines = []
    for config, found in results["largest_batch"].items():
        per_volume = found["gib_per_volume"]
        cost = f", {per_volume:.2f} GiB per volume" if per_volume is not None else ""
        lines.append(
            f"- largest {config} step on this {total:.0f} GiB device: {found['largest']} volumes{cost}"
        )
    return "\n".join(lines)


def markdown_tables(results: dict[str, Any]) -> str:
    """Everything the README shows of a benchmark run."""
    parts = [f"Machine: {_machine_line(results['machine'])}.", step_table(results)]
    if "loader" in results:
        parts.append(loader_table(results))
    if "amp_check" in results:
        parts.append(amp_table(results))
    if "largest_batch" in results:
        parts.append(largest_batch_lines(results))
    if "kmeans" in results:
        parts.append(clustering_lines(results))
    return "\n\n".join(parts) + "\n"
