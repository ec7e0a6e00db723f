"""The performance benchmark's library: the plain-loop baseline computes the same function with the
batching taken out, interleaving rotates the order, ratios pair rounds, peaks belong to their block, tables
say what the numbers say."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from jointssl_monai.apps.bench import amp_check, machine
from jointssl_monai.apps.bench.amp_check import compare_curves
from jointssl_monai.apps.bench.authors import AuthorsStep
from jointssl_monai.apps.bench.capacity import is_out_of_memory, largest_fitting
from jointssl_monai.apps.bench.clustering import bench_kmeans
from jointssl_monai.apps.bench.loader import bench_loader, copy_sample_volumes
from jointssl_monai.apps.bench.machine import PeakMemory
from jointssl_monai.apps.bench.results import markdown_tables
from jointssl_monai.apps.bench.step import STEP_CONFIGS, build_step, measure_steps
from jointssl_monai.apps.bench.timing import interleaved_times, paired_ratio
from jointssl_monai.utils import precision
from jointssl_monai.utils.precision import bf16_native, resolve_amp

TINY = {
    "backbone": "resnet10", "d_model": 32, "num_layers": 1, "ff_dim": 32, "proj_hidden_dim": 32,
    "proj_dim": 16, "prototypes": 4, "slices": 4, "size": 64, "volumes": 2, "images": 1,
    "intra_method": "swav", "inter_method": "swav",
}  # fmt: skip


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(STEP_CONFIGS, "tiny", TINY)
    return "tiny"


def _outputs(net, batch):
    net.eval()
    torch.manual_seed(0)  # the same masks for both networks
    with torch.no_grad():
        out = net(**{k: v for k, v in batch.items() if k not in ("volume_index", "image_index")})
    return [
        *out.intra.scores[0], *out.inter.scores[0], *out.volume_features, *out.masked_prediction,
        *out.intra.embeddings,
    ]  # fmt: skip


def test_plain_loop_computes_the_batched_function(tiny):
    batched, plain = build_step(tiny), build_step(tiny, plain=True)
    state = {
        k.replace("aggregator.", "aggregator.inner.", 1): v
        for k, v in batched.trainer.network.state_dict().items()
    }
    plain.trainer.network.load_state_dict(state)
    a, b = _outputs(batched.trainer.network, batched.batch), _outputs(plain.trainer.network, plain.batch)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)


def test_plain_loop_calls_the_encoder_per_view_and_item_and_the_aggregator_per_sequence(tiny):
    calls = {}
    for plain in (False, True):
        net = build_step(tiny, plain=plain).trainer.network
        aggregator = net.aggregator.inner if plain else net.aggregator
        counts = {"encoder": 0, "aggregator": 0}
        net.encoder.register_forward_hook(lambda *a, c=counts: c.__setitem__("encoder", c["encoder"] + 1))
        aggregator.register_forward_hook(
            lambda *a, c=counts: c.__setitem__("aggregator", c["aggregator"] + 1)
        )
        batch = build_step(tiny).batch
        net(**{k: v for k, v in batch.items() if k not in ("volume_index", "image_index")})
        calls[plain] = counts
    assert calls[False] == {"encoder": 1, "aggregator": 1}
    # 2 views x (2 volumes + 1 image); 2 volumes x (2 views for the inter level + 2 masked views)
    assert calls[True] == {"encoder": 6, "aggregator": 8}


def test_interleaved_times_warms_up_then_rotates_the_order():
    order: list[str] = []
    cases = {name: (lambda n=name: order.append(n)) for name in "abc"}

    def clock(fn, device):
        fn()
        return float(len(order))

    times = interleaved_times(cases, rounds=3, warmup=1, clock=clock)
    assert "".join(order) == "abc" + "abc" + "bca" + "cab"
    assert times == {"a": [4.0, 9.0, 11.0], "b": [5.0, 7.0, 12.0], "c": [6.0, 8.0, 10.0]}
    with pytest.raises(ValueError, match="rounds"):
        interleaved_times(cases, rounds=0)


def test_paired_ratio_pairs_rounds():
    assert paired_ratio([2.0, 4.0, 6.0], [1.0, 1.0, 3.0]) == {"median": 2.0, "min": 2.0, "max": 4.0}
    # the ratio of medians would be 4 / 1 = 4: pairing keeps each round's load on both sides
    assert paired_ratio([2.0, 4.0, 9.0], [1.0, 4.0, 1.0])["median"] == 2.0
    with pytest.raises(ValueError, match="same"):
        paired_ratio([1.0], [1.0, 2.0])


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs"
)
@pytest.mark.skipif(
    any(k.startswith("MALLOC_") for k in os.environ), reason="glibc keeps freed memory resident"
)
def test_peak_memory_belongs_to_its_block():
    with PeakMemory() as quiet:
        pass
    with PeakMemory() as busy:
        x = torch.ones(100_000_000)  # 0.37 GiB, touched
        del x
    with PeakMemory() as after:
        pass
    assert busy.gib > quiet.gib + 0.3
    assert after.gib < busy.gib - 0.3  # the high-water mark was reset, not the process's lifetime peak


def test_bf16_native_reads_the_cpu_flags_and_auto_follows_it(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: ("avx2", "avx512_bf16"))
    assert bf16_native("cpu") and resolve_amp("auto", "cpu") == "bf16"
    assert machine.describe_machine("cpu")["bf16_native"]
    monkeypatch.setattr(precision, "cpu_flags", lambda: ("avx2", "avx512f"))
    assert not bf16_native("cpu") and resolve_amp("auto", "cpu") == "none"
    assert resolve_amp("fp16", "cpu") == "fp16" and resolve_amp("none", "cpu") == "none"


def test_measure_steps_reports_every_case_against_its_baselines(tiny):
    result = measure_steps(tiny, "cpu", rounds=2, matmul_rate={"none": 1e9, "bf16": 2e9})
    cases = {c["case"]: c for c in result["cases"]}
    assert list(cases) == [
        "plain loop fp32", "batched fp32", "batched fp32 channels-last", "batched bf16",
        "batched bf16 channels-last",
    ]  # fmt: skip
    assert cases["plain loop fp32"]["vs_plain"] is None and cases["batched fp32"]["vs_fp32"] is None
    assert cases["batched bf16"]["vs_fp32"] == paired_ratio(
        cases["batched fp32"]["seconds"], cases["batched bf16"]["seconds"]
    )
    # the plain loop does the same arithmetic, only in more calls
    fp32 = [c["gflop"] for c in cases.values() if c["amp"] == "none"]
    assert fp32[0] > 0 and fp32 == [fp32[0]] * 3
    for case in cases.values():
        assert len(case["seconds"]) == 2
        assert len(case["losses"]) == 4  # FLOP count, warm-up, 2 rounds
        assert all(math.isfinite(v) for v in case["losses"])
        rate = 2e9 if case["amp"] == "bf16" else 1e9
        assert case["utilisation"] == pytest.approx(case["gflop"] * 1e9 / case["median_s"] / rate)
        assert case["slices_per_s"] == pytest.approx(2 * (2 * 4 + 1) / case["median_s"])


def _results(consumed=None, ld_preload=""):
    case = {
        "case": "batched bf16", "plain": False, "amp": "bf16", "channels_last": False, "median_s": 0.5,
        "volumes_per_s": 4.0, "slices_per_s": 128.0, "peak_gib": 1.25, "step_gib": None, "gflop": 57.0,
        "utilisation": 0.5,
        "vs_plain": {"median": 2.0, "min": 1.9, "max": 2.25},
        "vs_fp32": {"median": 1.5, "min": 1.4, "max": 1.6},
    }  # fmt: skip
    loader = {"rows": [{"cache": "memory", "workers": 2, "volumes_per_s": 8.0, "slices_per_s": 128.0}]}
    if consumed:
        loader["step_consumes_volumes_per_s"] = consumed
    return {
        "machine": {
            "cpu": {"model": "CPU-X"},
            "cpu_count": 2,
            "torch": "2.x",
            "monai": "1.x",
            "torch_threads": 2,
            "allocator": {"malloc_env": {}, "ld_preload": ld_preload},
            "bf16_native": True,
        },
        "steps": {"demo": {"cases": [case]}},
        "loader": loader,
        "kmeans": {"n": 1000, "dim": 8, "k": 10, "iterations": 2, "faiss": "faiss-cpu not installed"},
        "sinkhorn": {"rows": 4, "k": 3, "iterations": 3, "median_ms": 0.25},
    }


def test_markdown_tables_put_ratios_first_and_name_the_machine():
    text = markdown_tables(_results(consumed=2.0))
    assert (
        "CPU-X, 2 cores; torch 2.x, MONAI 1.x, 2 threads, allocator: glibc defaults; bf16 in hardware: yes"
        in text
    )
    ratios = "| demo | batched bf16 | 2.00x (1.90-2.25) | 1.50x (1.40-1.60) | - |"
    assert ratios + " 0.500 | 4.00 | 128 | 1.25 | - | 57 | 50 % |" in text
    assert "| memory | 2 | 8.00 | 128 | 4.0x |" in text
    assert "faiss-cpu not installed" in text and "Sinkhorn-Knopp, 4 x 3, 3 iterations: 0.2 ms" in text
    text = markdown_tables(_results(ld_preload="libjemalloc.so.2"))
    assert "| memory | 2 | 8.00 | 128 | - |" in text and "LD_PRELOAD=libjemalloc.so.2" in text


def test_kmeans_bench_without_faiss_reports_it_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    result = bench_kmeans(n=300, dim=8, k=5, iterations=2, rounds=1)
    assert result["faiss"] == "faiss-cpu not installed" and "faiss_over_ours" not in result
    assert list(result["seconds"]) == ["ours"] and len(result["seconds"]["ours"]) == 1
    assert 0.0 < result["ours_mean_cosine"] <= 1.0


def test_loader_bench_counts_every_real_volume(tmp_path: Path):
    entries = copy_sample_volumes(tmp_path, copies=1)
    assert [Path(e["image"]).name for e in entries] == ["colin27_t1_0.nii.gz", "itk_t1_0.nii.gz"]
    row = bench_loader(entries, num_slices=4, size=32, volumes_per_batch=1, cache="none", workers=0,
                       cache_dir=tmp_path / "cache", epochs=1)  # fmt: skip
    assert row["volumes_per_s"] * row["epoch_s"] == pytest.approx(2)
    assert row["slices_per_s"] * row["epoch_s"] == pytest.approx(2 * 4)


#: A stand-in for the authors' ``utils/models.py`` with their class names and signatures (their file is not
#: available offline): enough to test the glue that imports it and runs their step.
AUTHORS_MODELS = """
import torch
from torch import nn


class ResNet(nn.Module):
    def __init__(self, normalize=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 640, 3)

    def forward(self, x):
        b, n = x.shape[:2]
        return self.conv(x.flatten(0, 1)).mean((2, 3)).reshape(b, n, 640)


class EncoderModel(nn.Module):
    def __init__(self, n_frames, d_model, ffn_hidden, drop_prob, n_layers):
        super().__init__()
        self.encoder = nn.Linear(d_model, d_model)

    def forward(self, src):
        return self.encoder(src)


class MultiPrototypes(nn.Module):
    def __init__(self, output_dim, nmb_prototypes):
        super().__init__()
        self.prototypes0 = nn.Linear(output_dim, nmb_prototypes[0], bias=False)

    def forward(self, x):
        return [self.prototypes0(x)]


class ResNet_Trans(nn.Module):
    def __init__(self, intra, inter, prototypes=None):
        super().__init__()
        self.intra, self.inter, self.prototypes = intra, inter, prototypes

    def forward(self, x):
        x = nn.functional.normalize(torch.mean(self.inter(self.intra(x)), 1), dim=1)
        return x, self.prototypes(x)
"""


@pytest.fixture
def authors_dir(tmp_path):
    (tmp_path / "utils").mkdir()
    (tmp_path / "utils" / "models.py").write_text(AUTHORS_MODELS)
    return tmp_path


def test_authors_step_trains_their_model_on_two_views(authors_dir):
    step = AuthorsStep(authors_dir, TINY)
    assert step.inputs.shape == (2 * TINY["volumes"], TINY["slices"], 3, TINY["size"], TINY["size"])
    torch.testing.assert_close(step.inputs[TINY["volumes"] :], step.inputs[: TINY["volumes"]].flip(-1))
    before = [p.detach().clone() for p in step.model.parameters()]
    loss = step.run()
    # SwAV's swapped prediction at 0.1 over 4 prototypes: a cross-entropy between log(4) / 0.1-sharp extremes
    assert math.isfinite(loss) and 0.0 < loss < 40.0 and step.losses == [loss]
    assert all(not torch.equal(a, b) for a, b in zip(before, step.model.parameters(), strict=True))
    step.model.prototypes.prototypes0.weight.data.mul_(3.0)
    step.run()  # each step starts by putting the prototypes back on the unit sphere, as theirs does
    norms = torch.linalg.vector_norm(step.model.prototypes.prototypes0.weight.detach(), dim=1)
    assert float((norms - 1).abs().max()) < 0.2  # one SGD step away from unit length, not 3
    with pytest.raises(FileNotFoundError, match="checkout of the authors"):
        AuthorsStep(authors_dir / "missing", TINY)


def test_measure_steps_times_the_authors_step_beside_ours(tiny, authors_dir):
    result = measure_steps(
        tiny, "cpu", rounds=1, matmul_rate={"none": 1e9, "bf16": 1e9}, authors_dir=authors_dir
    )
    cases = {c["case"]: c for c in result["cases"]}
    authors = cases["authors' ResNet_Trans fp32"]
    assert authors["authors"] and authors["vs_authors"] is None and authors["vs_plain"] is None
    assert authors["slices_per_s"] == pytest.approx(2 * 2 * 4 / authors["median_s"])  # volumes only
    for name, case in cases.items():
        if name != "authors' ResNet_Trans fp32":
            assert case["vs_authors"] == paired_ratio(authors["seconds"], case["seconds"])


def _history(values):
    return [{"loss": v, "loss_intra": v / 2} for v in values]


def test_compare_curves_measures_the_gap_in_seed_spreads():
    fp32 = [_history([5.0, 4.0]), _history([5.0, 4.2]), _history([5.0, 4.4])]  # last epoch 4.2 +/- 0.2
    close = [_history([5.1, 4.1]), _history([5.1, 4.3]), _history([5.1, 4.5])]
    report = compare_curves({"none": fp32, "bf16": close})
    loss = report["losses"]["loss"]
    assert (report["seeds"], report["epochs"]) == (3, 2)
    assert loss["fp32_last_mean"] == pytest.approx(4.2) and loss["fp32_last_sd"] == pytest.approx(0.2)
    assert loss["last_gap"] == pytest.approx(0.1) and loss["last_gap_over_seed_sd"] == pytest.approx(0.5)
    assert loss["largest_gap"] == pytest.approx(0.1) and loss["median_seed_sd"] == pytest.approx(0.1)
    assert report["losses"]["loss_intra"]["last_gap"] == pytest.approx(0.05)
    assert "loss_mask" not in report["losses"] and report["within_seed_noise"]
    far = [_history([5.0, 4.8]), _history([5.0, 5.0]), _history([5.0, 5.2])]  # 0.8 = 4 seed sd off
    assert not compare_curves({"none": fp32, "bf16": far})["within_seed_noise"]
    with pytest.raises(ValueError, match="same seeds"):
        compare_curves({"none": fp32, "bf16": close[:2]})


def _steps_up_to(fitting: int, made: list[int]):
    def step_for(n: int):
        made.append(n)

        def step():
            if n > fitting:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        return step

    return step_for


def test_largest_fitting_doubles_then_bisects():
    made: list[int] = []
    result = largest_fitting(_steps_up_to(37, made), limit=1024, device="cpu")
    assert result["largest"] == 37
    assert made == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert [n for n, fitted in result["tries"].items() if not fitted] == [64, 48, 40, 38]
    # the limit caps the search; nothing that fits gives 0
    assert largest_fitting(_steps_up_to(100, []), limit=20, device="cpu")["largest"] == 20
    assert largest_fitting(_steps_up_to(0, []), limit=8, device="cpu") == {
        "largest": 0, "tries": {1: False}, "gib_per_volume": None,
    }  # fmt: skip


def test_largest_fitting_lets_other_errors_through():
    def step_for(n: int):
        def step():
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

        return step

    with pytest.raises(RuntimeError, match="shapes"):
        largest_fitting(step_for, limit=4, device="cpu")
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory")) and is_out_of_memory(MemoryError())


def test_largest_batch_lines_and_a_step_of_more_volumes(tiny):
    results = _results()
    results["largest_batch"] = {"demo": {"largest": 37, "tries": {}, "gib_per_volume": 1.5}}
    results["largest_batch_device_gib"] = 79.6
    line = "- largest demo step on this 80 GiB device: 37 volumes, 1.50 GiB per volume"
    assert line in markdown_tables(results)
    step = build_step(tiny, volumes=3)
    assert step.batch["volume_views"][0].shape[0] == 3 and step.batch["num_slices"].tolist() == [4, 4, 4]
    assert STEP_CONFIGS[tiny]["volumes"] == 2  # the configuration itself is left as it was


def test_amp_check_runs_the_demo_per_seed_under_both_settings(monkeypatch, tmp_path):
    calls = []

    def fake_run_demo(output, max_epochs, report, amp, seed):
        calls.append((seed, amp, max_epochs, report))
        history = Path(output) / "history.json"
        history.parent.mkdir(parents=True)
        offset = 0.1 if amp == "bf16" else 0.0
        epochs = [{"epoch": e, "loss": 5.0 - e + seed + offset, "other": 1.0} for e in range(max_epochs)]
        history.write_text(json.dumps({"epochs": epochs}))
        return {"minutes": 0.5, "loss_history": str(history)}

    monkeypatch.setattr(amp_check, "run_demo", fake_run_demo)
    report = amp_check.run_amp_check(tmp_path, seeds=(0, 1), max_epochs=3)
    assert calls == [
        (0, "none", 3, False),
        (0, "bf16", 3, False),
        (1, "none", 3, False),
        (1, "bf16", 3, False),
    ]
    assert report["curves"]["bf16"][1] == [{"loss": 6.1}, {"loss": 5.1}, {"loss": 4.1}]
    assert report["losses"]["loss"]["last_gap"] == pytest.approx(0.1) and report["minutes"]["none"] == [
        0.5,
        0.5,
    ]
