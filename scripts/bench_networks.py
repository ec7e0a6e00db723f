"""Benchmark one pretraining step (forward + backward) of ``JointSSLNet``: time per volume and peak memory.

Every case runs in a fresh subprocess, so that peak memory (CPU: the process's maximum resident set
size; CUDA: ``torch.cuda.max_memory_allocated``) belongs to that case alone and the glibc allocator setting
can differ between cases. Times are medians over repetitions after warm-up steps.

Cases:

- ``small``: ResNet-18, d_model 128, 2 layers, 2 volumes x 16 slices of 64x64 plus 4 2D images, both
  stem strides.
- ``paper``: the paper configuration: ResNet-50, d_model 640, 4 deformable layers (ff 720), 3000
  prototypes per level, one volume of 64 slices of 128x128, two views.
- ``paper-stride``: the paper network on 16 slices, stem stride 2 vs 1 (the stride-1 cost, without the
  memory of 64 slices at full stem resolution).

On CPU each case runs with glibc's default allocator settings and/or with ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=<large>`` ("steady"), which keeps freed memory for reuse instead of returning it to the
kernel.

Usage::

    python scripts/bench_networks.py                      # CPU: small, paper, paper-stride
    python scripts/bench_networks.py --cases small --reps 5
    python scripts/bench_networks.py --device cuda        # adds channels-last and bf16-autocast variants
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

STEADY_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}

NETS = {
    "small": dict(
        backbone="resnet18",
        d_model=128,
        proj_hidden_dim=256,
        proj_dim=64,
        intra_prototypes=300,
        inter_prototypes=300,
        num_layers=2,
        ff_dim=144,
    ),
    "paper": dict(backbone="resnet50", d_model=640, num_layers=4, ff_dim=720),
}
DATA = {
    "small": dict(volumes=2, slices=16, size=64, images=4),
    "paper": dict(volumes=1, slices=64, size=128, images=0),
    "paper-stride": dict(volumes=1, slices=16, size=128, images=0),
}


def cases(names: list[str], device: str, allocators: list[str], reps: int | None) -> list[dict]:
    """Expand case names into the list of runs (one subprocess each)."""
    out = []
    allocs = allocators if device == "cpu" else ["default"]
    for name in names:
        net = NETS["small" if name == "small" else "paper"]
        base = dict(
            case=name, net=net, data=DATA[name], device=device, reps=reps or (5 if name == "small" else 3)
        )
        if name == "small":
            variants = [dict(conv1_t_stride=s, allocator=a) for s in (2, 1) for a in allocs]
        elif name == "paper":
            variants = [dict(conv1_t_stride=2, allocator=a) for a in allocs]
        else:
            variants = [dict(conv1_t_stride=s, allocator=allocs[0]) for s in (2, 1)]
        if device == "cuda" and name != "small":
            variants += [
                dict(conv1_t_stride=2, allocator="default", channels_last=True),
                dict(conv1_t_stride=2, allocator="default", autocast="bf16"),
            ]
        out += [{**base, **v} for v in variants]
    return out


def _scalar_loss(out, temperature: float = 0.1):
    """A stand-in for the three objectives touching every output (cost comparable to the real losses)."""
    import torch

    total = torch.zeros((), device=out.valid.device if out.valid is not None else "cpu")
    for branch in (out.intra, out.inter):
        if branch is None:
            continue
        for per_view in branch.scores + branch.local_scores:
            for s in per_view:
                total = total + torch.logsumexp(s.float() / temperature, dim=1).mean()
    for pred, target, mask in zip(
        out.masked_prediction or [], out.masked_target or [], out.mask or [], strict=True
    ):
        m = mask[..., None].float()
        total = total + ((pred.float() - target.float()) ** 2 * m).sum() / m.sum().clamp(min=1)
    return total


def worker(spec: dict) -> dict:
    """Run one case in this process and return its measurements."""
    import torch

    from jointssl_monai.networks import JointSSLNet

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    net = JointSSLNet.from_settings(
        **spec["net"],
        conv1_t_stride=spec["conv1_t_stride"],
        channels_last=spec.get("channels_last", False),
    ).to(device)
    net.train()
    d = spec["data"]
    b, s, hw = d["volumes"], d["slices"], d["size"]
    vols = [torch.randn(b, 1, s, hw, hw, device=device) for _ in range(2)]
    num_slices = torch.full((b,), s, dtype=torch.long, device=device)
    imgs = [torch.randn(d["images"], 1, hw, hw, device=device) for _ in range(2)] if d["images"] else None
    use_bf16 = spec.get("autocast") == "bf16"

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> float:
        net.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = net(vols, num_slices, imgs)
            loss = _scalar_loss(out)
        loss.backward()
        sync()
        return time.perf_counter() - start

    warmup = 1 if device.type == "cpu" else 3
    for _ in range(warmup):
        step()
    times = [step() for _ in range(spec["reps"])]
    result = {
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "s_per_volume": statistics.median(times) / b,
        "slices_encoded_per_step": 2 * (b * s + d["images"]),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["gpu"] = torch.cuda.get_device_name()
    else:
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def run_case(spec: dict) -> dict:
    """Run one case in a fresh subprocess with its allocator environment."""
    env = dict(os.environ)
    for key in STEADY_ENV:
        env.pop(key, None)
    if spec["allocator"] == "steady":
        env.update(STEADY_ENV)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        return {**spec, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return {**spec, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cases", default="small,paper,paper-stride")
    parser.add_argument("--allocators", default="steady,default", help="CPU only: steady and/or default")
    parser.add_argument(
        "--reps", type=int, default=None, help="timed steps per case (default 5 small, 3 paper)"
    )
    parser.add_argument("--output", default="bench_results/networks.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    runs = cases(args.cases.split(","), args.device, args.allocators.split(","), args.reps)
    results = []
    load_before = os.getloadavg()
    for spec in runs:
        res = run_case(spec)
        results.append(res)
        mem = res.get("peak_rss_gib", res.get("peak_mem_gib"))
        extra = "".join(f" {k}={spec[k]}" for k in ("channels_last", "autocast") if k in spec)
        label = f"{spec['case']:13s} stride={spec['conv1_t_stride']} alloc={spec['allocator']:7s}{extra}"
        if "error" in res:
            print(f"{label}: {res['error']}")
        else:
            print(
                f"{label}: step {res['step_s_median']:.3f} s, {res['s_per_volume']:.3f} s/volume, "
                f"peak {mem:.2f} GiB",
                flush=True,
            )
    report = {
        "device": args.device,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "steady_allocator_env": STEADY_ENV,
        "results": results,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
