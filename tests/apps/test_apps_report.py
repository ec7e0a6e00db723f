"""``jointssl report`` on a short real-data pretraining run: every figure is a valid, non-blank PNG of its
documented size, and the page, opened in headless Chromium over HTTP, loads every image; predicted masks of
a fine-tuning output are overlaid with the right Dice; without matplotlib the command names the extra.

Chromium (Debian ``chromium``) is driven without any browser-automation package: the report folder is
served by ``http.server`` on 127.0.0.1 next to a small check page that loads ``index.html`` in an iframe
and, once it has loaded, writes every image's ``naturalWidth``/``naturalHeight`` into its own DOM;
``chromium --headless --dump-dom`` prints that DOM. Under ``CI=true`` a missing Chromium or matplotlib
fails the test; elsewhere it skips.
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "engines"))  # the bundle-run helpers live there
from pretrain_bundle_runs import run_bundle, small_real_datalist

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

CHECK_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>image check</title></head><body>
<pre id="result">pending</pre>
<iframe id="report" src="report/index.html" width="1600" height="1200"></iframe>
<script>
document.getElementById("report").addEventListener("load", function () {
  var images = Array.prototype.slice.call(this.contentDocument.images);
  var done = images.map(function (img) {
    return img.complete ? Promise.resolve() : new Promise(function (ok) { img.onload = img.onerror = ok; });
  });
  Promise.all(done).then(function () {
    document.getElementById("result").textContent = JSON.stringify(images.map(function (img) {
      return {src: img.getAttribute("src"), width: img.naturalWidth, height: img.naturalHeight};
    }));
  });
});
</script></body></html>
"""


def _missing(reason: str):
    if IN_CI:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    _missing("headless Chromium is not installed (apt-get install -y chromium chromium-driver)")
    raise AssertionError  # unreachable


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _images_seen_by_chromium(folder: Path, browser: str, profile: Path) -> list[dict]:
    """Serve ``folder`` (holding ``report/``) on 127.0.0.1 and let headless Chromium load the check page."""
    (folder / "check.html").write_text(CHECK_PAGE)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/check.html"
        command = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", url,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r'<pre id="result">(.*?)</pre>', result.stdout, re.S)
    assert found, f"no result in the DOM Chromium dumped:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert found.group(1) != "pending", "the report page did not finish loading in Chromium"
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, itk_t1, pydicom_ct_series):
    """A 2-epoch tiny pretraining run on the real demo images (without Colin27), as the bundle writes it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _missing('matplotlib is not installed (pip install "jointssl-monai[report]")')
    root = tmp_path_factory.mktemp("run")
    run_bundle(root, datalist=str(small_real_datalist(root)), max_epochs=2)
    return root


def _add_finetuning_output(root: Path) -> float:
    """A fine-tuning output as train.json + inference.json leave it: models/model.pt and a predicted mask of
    the bundle's test image on its own grid (here the reference mask without its lower half, so the Dice is
    known). Returns that Dice."""
    from jointssl_monai.apps.report_run import segmentation_cases
    from jointssl_monai.apps.sample_datalists import brain_extraction_datalist

    cases, note = segmentation_cases(root)
    assert not cases and "no fine-tuning output" in note
    torch.save({}, root / "models" / "model.pt")
    cases, note = segmentation_cases(root)
    assert not cases and "no predicted masks" in note

    case = brain_extraction_datalist("test", root / "eval" / "sample_labels")[0]
    label = nib.load(case["label"])
    mask = np.asarray(label.dataobj) > 0
    prediction = mask.copy()
    prediction[..., : mask.shape[2] // 2] = False
    name = Path(case["image"]).name.removesuffix(".nii.gz") + "_seg.nii.gz"  # SaveImaged's name
    nib.save(nib.Nifti1Image(prediction.astype(np.uint8), label.affine), str(root / "eval" / name))
    return 2.0 * float((prediction & mask).sum()) / float(prediction.sum() + mask.sum())


def _add_value_results(root: Path) -> list[dict]:
    """A value-benchmark result file in the run folder (the report draws it when present)."""
    rows = [
        {"task": "brain extraction", "setting": "probe, 2 slices", "init": init, "seed": seed, "score": score}
        for seed in range(5)
        for init, score in (("ssl", 0.80 + 0.01 * seed), ("random", 0.75 + 0.01 * seed + 0.02 * (seed == 0)))
    ]
    rows += [{**r, "init": "threshold", "score": 0.7} for r in rows if r["init"] == "ssl"]
    (root / "bench_results").mkdir(exist_ok=True)
    (root / "bench_results" / "ssl_value.json").write_text(json.dumps({"metric": "dice", "rows": rows}))
    return rows


def test_report_figures_load_in_headless_chromium(pretrained_run, tmp_path, itk_t1, itk_t1_skullstrip):
    from PIL import Image

    from jointssl_monai.apps.cli import JointSSLCommands
    from jointssl_monai.apps.report_figures import FIGURES, figure_pixels, tsne_available

    browser = _chromium()
    expected_dice = _add_finetuning_output(pretrained_run)
    value_rows = _add_value_results(pretrained_run)
    output = tmp_path / "site" / "report"
    page = Path(JointSSLCommands().report(str(pretrained_run), output=str(output), device="cpu"))
    assert page == output / "index.html" and page.is_file()

    manifest = json.loads((output / "report.json").read_text())
    names = [f["file"] for f in manifest["figures"]]
    wanted = set(FIGURES) - (set() if tsne_available() else {"embedding_tsne.png"})
    assert set(names) == wanted, manifest["notes"]
    assert sorted(p.name for p in output.glob("*.png")) == sorted(names)
    for name in names:
        path = output / name
        assert path.stat().st_size > 0, name
        with Image.open(path) as image:
            image.verify()  # a complete, uncorrupted PNG
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == figure_pixels(name), (name, image.size)
            pixels = np.asarray(image.convert("L"), dtype=float)
        assert pixels.std() > 0, f"{name} is blank"

    (case,) = manifest["segmentation"]["cases"]
    assert case["case"] == "KmeansTest_T1UCharRaw"
    assert case["dice"] == pytest.approx(expected_dice, abs=1e-6) and 0.3 < expected_dice < 0.95
    text = page.read_text()
    assert f"Dice {expected_dice:.3f}" in text
    assert re.findall(r'<img src="([^"]+)"', text) == names
    # the value benchmark's table: ssl +0.05 over random on every seed but one
    assert manifest["value"]["rows"][0][:2] == ["brain extraction", "probe, 2 slices"]
    assert html.escape(manifest["value"]["rows"][0][-1]) in text and len(value_rows) == 15

    seen = _images_seen_by_chromium(output.parent, browser, tmp_path / "chromium-profile")
    assert [s["src"] for s in seen] == names
    for image in seen:
        assert image["width"] > 0 and image["height"] > 0, f"Chromium did not load {image['src']}"
        assert (image["width"], image["height"]) == figure_pixels(image["src"])


def test_report_without_matplotlib_names_the_extra(monkeypatch, capsys, tmp_path):
    from jointssl_monai.apps.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path), "--output", str(tmp_path / "report")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "jointssl-monai[report]"' in err
    assert not (tmp_path / "report").exists()


def test_report_of_a_folder_that_is_no_run_is_one_line_and_exit_2(capsys, tmp_path):
    from jointssl_monai.apps.cli import main
    from jointssl_monai.apps.report_figures import require_matplotlib

    try:
        require_matplotlib()
    except ImportError:
        _missing("matplotlib is not installed")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "nothing"), "--output", str(tmp_path / "report")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing" in err and "Traceback" not in err


COMMON = {
    "backbone": "resnet10", "d_model": 32, "proj_hidden_dim": 24, "proj_dim": 16, "num_layers": 2,
    "ff_dim": 40, "intra_prototypes": 6, "inter_prototypes": [2, 3], "mask_decoder_hidden_dim": 20,
}  # fmt: skip


@pytest.mark.parametrize(
    "settings",
    [
        {"attention": "full", "heads": 2, "dim_head": 64, "multi_stage": False, "proj_batch_norm": False,
         "intra_prototypes": [5, 7], "inter_prototypes": [3], "proj_num_layers": 3},
        {"attention": "deformable", "heads": 4, "dim_head": 8, "inter_proj_batch_norm": True,
         "deformable_kwargs": {"grouped_projections": False, "cpb_hidden_dim": 6, "cpb_depth": 1,
                               "offset_kernel_size": 5}},
    ],
)  # fmt: skip
def test_network_is_rebuilt_from_its_weights(settings):
    """The sizes the report reads from a checkpoint's weights rebuild the same network."""
    from jointssl_monai.apps.report_run import rebuild_network
    from jointssl_monai.networks import JointSSLNet

    torch.manual_seed(0)
    net = JointSSLNet.from_settings(**{**COMMON, **settings}).eval()
    rebuilt, kwargs, _ = rebuild_network(net.state_dict(), {"backbone": "resnet10"})
    for key, value in settings.items():
        if key == "deformable_kwargs":
            assert value.items() <= kwargs[key].items()
        else:
            assert kwargs[key] == value, key
    slices = torch.rand(7, 1, 32, 32)
    tokens = torch.randn(1, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encoder(slices), net.encoder(slices))
        torch.testing.assert_close(rebuilt.aggregator(tokens)[1], net.aggregator(tokens)[1])
