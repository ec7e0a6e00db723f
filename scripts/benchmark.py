"""The project's performance benchmark: every speed-up a ratio measured in one run, interleaved.

Measures, on one machine and in one process:

- a full pretraining step (forward, joint loss, backward, optimiser step) of the demo and the paper
  configuration, against the same step written as a plain per-view, per-volume loop; float32 and bf16
  autocast, channels-last on and off; volumes/s, slices/s, peak memory (RSS on a CPU, allocated on a GPU),
  and achieved FLOP/s over the machine's own dense matmul FLOP/s in the same dtype;
- the pretraining loader (no cache, memory cache, disk cache; 1 and 2 workers) on real volumes, next to what
  the default step of the demo configuration consumes;
- bf16 autocast against float32 on real data: short demo pretraining runs, 3 seeds each, loss curves
  compared with the spread between seeds;
- on a GPU, the largest number of volumes one default step takes, and the memory a volume costs;
- spherical k-means (100,000 x 128 into 3,000, 10 iterations) against faiss-cpu, and Sinkhorn-Knopp;
- with ``--authors_dir``, the authors' ``ResNet_Trans`` step at the paper configuration's shape, interleaved
  with ours (their ``utils/models.py`` imported unchanged; it needs ``einops`` and ``deformable-attention``).

Writes ``bench_results/results.json`` (``results_cuda.json`` on a GPU: numbers and the machine's description)
and prints the README's tables. On a GPU the memory figures are allocated device memory.

    python scripts/benchmark.py                      # everything, CPU or the first CUDA device
    python scripts/benchmark.py --configs demo --skip loader clustering --rounds 2
    python scripts/benchmark.py --configs paper --authors_dir CHECKOUT_OF_THE_AUTHORS_REPOSITORY
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 python scripts/benchmark.py --output b.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from jointssl_monai.apps.bench.amp_check import run_amp_check
from jointssl_monai.apps.bench.capacity import largest_fitting
from jointssl_monai.apps.bench.clustering import bench_kmeans, bench_sinkhorn
from jointssl_monai.apps.bench.loader import bench_loader, copy_sample_volumes
from jointssl_monai.apps.bench.machine import describe_machine, matmul_flops_per_s
from jointssl_monai.apps.bench.results import markdown_tables
from jointssl_monai.apps.bench.step import STEP_CONFIGS, build_step, measure_steps
from jointssl_monai.utils.precision import resolve_amp


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", default=["demo", "paper"], choices=sorted(STEP_CONFIGS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds of every step case")
    parser.add_argument("--skip", nargs="*", default=[], choices=["loader", "clustering", "amp_check"])
    parser.add_argument("--amp_check_epochs", type=int, default=20, help="epochs of each real-data run")
    parser.add_argument(
        "--authors_dir", default=None,
        help="a checkout of the authors' repository: their ResNet_Trans step joins the paper configuration",
    )  # fmt: skip
    parser.add_argument("--loader_copies", type=int, default=3, help="copies of each real volume to load")
    parser.add_argument(
        "--output", type=Path, default=None,
        help="default: bench_results/results.json on a CPU, bench_results/results_cuda.json on a GPU",
    )  # fmt: skip
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.output is None:  # GPU results are kept apart from CPU ones
        name = "results_cuda.json" if device.type == "cuda" else "results.json"
        args.output = Path("bench_results") / name

    results: dict = {"command": "python scripts/benchmark.py", "machine": describe_machine(device)}
    dtypes = {"none": torch.float32, "bf16": torch.bfloat16}
    results["matmul_gflop_per_s"] = {amp: matmul_flops_per_s(device, d) / 1e9 for amp, d in dtypes.items()}
    print("machine:", json.dumps(results["machine"]), flush=True)
    rate = {amp: gflops * 1e9 for amp, gflops in results["matmul_gflop_per_s"].items()}
    results["steps"] = {}
    for name in args.configs:
        authors = args.authors_dir if name == "paper" else None  # their model has the paper's dimensions
        results["steps"][name] = measure_steps(name, device, args.rounds, rate, authors_dir=authors)
        _save(results, args.output)
        for case in results["steps"][name]["cases"]:
            print(f"{name} {case['case']}: {case['median_s']:.3f} s/step", flush=True)

    if device.type == "cuda":  # on a CPU running out of memory ends the process instead of raising
        amp = resolve_amp("auto", device)
        results["largest_batch"] = {
            name: largest_fitting(
                lambda n, name=name: build_step(name, amp, True, device=device, volumes=n).run, device=device
            )
            for name in args.configs
        }
        results["largest_batch_device_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        _save(results, args.output)
    if "loader" not in args.skip:
        results["loader"] = _loader(results, args.loader_copies)
        _save(results, args.output)
    if "amp_check" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            results["amp_check"] = run_amp_check(tmp, max_epochs=args.amp_check_epochs)
        _save(results, args.output)
    if "clustering" not in args.skip:
        results["kmeans"] = bench_kmeans()
        results["sinkhorn"] = bench_sinkhorn()
        _save(results, args.output)
    print(markdown_tables(results))
    print(f"saved {args.output}")


def _loader(results: dict, copies: int) -> dict:
    """The loader on the demo configuration's shape, against what the bundle's default step consumes there
    (``amp`` "auto", channels-last); uses the demo step's time when it was measured in this run."""
    config = STEP_CONFIGS["demo"]
    block: dict = {"num_slices": config["slices"], "size": config["size"]}
    block["volumes_per_batch"] = config["volumes"]
    demo = results["steps"].get("demo")
    if demo is not None:
        cases = demo["cases"]
        amp = resolve_amp("auto", results["machine"]["device"])
        default = next(c for c in cases if (c["plain"], c["amp"], c["channels_last"]) == (0, amp, 1))
        block["step_consumes_volumes_per_s"] = config["volumes"] / statistics.median(default["seconds"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        entries = copy_sample_volumes(Path(tmp), copies)
        block["volumes"] = len(entries)
        for cache in ("none", "memory", "disk"):
            for workers in (1, 2):
                row = bench_loader(
                    entries, config["slices"], config["size"], config["volumes"], cache, workers,
                    Path(tmp) / f"cache_{workers}",
                )  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
    block["rows"] = rows
    return block


def _save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
