"""``jointssl report RUN_DIR --output report/``: one static HTML page with PNG figures of what a run learned.

A run folder is the ``bundle_root`` of a pretraining run (``jointssl demo`` writes ``runs/demo``), holding

- ``runs/pretrain/history.json`` (per-epoch averages) and TensorBoard events (per-iteration scalars),
- ``models/ssl/checkpoints/checkpoint_final.pt`` (or the newest checkpoint) and ``models/ssl/encoder.json``,
- ``datalist.json`` (the demo writes it; pass ``datalist`` otherwise),
- optionally a fine-tuning output of ``bundle/configs/train.json`` in the same root: ``models/model.pt`` and
  predicted masks ``eval/*_seg.nii.gz`` (written by ``inference.json`` or ``evaluate.json``).

The figures: loss curves per component; code entropy, clusters in use, largest cluster share and slice-token
spread over time; cluster occupancy; a 2D map (PCA, and t-SNE when scikit-learn is installed) of slice and
volume embeddings coloured by modality and source; a nearest-neighbour grid (query slices and their closest
slices from other sources); attention over slices for a few volumes; and, for a fine-tuning output, the
predicted masks over the real slices with Dice per case.

Reading the run is :mod:`jointssl_monai.apps.report_run`, drawing the figures
:mod:`jointssl_monai.apps.report_figures`; this module writes the page.

Plotting needs matplotlib (the ``report`` extra, ``pip install "jointssl-monai[report]"``); it is imported
only when a report is made. Nothing here is imported by the core package.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from jointssl_monai.apps.report_figures import (
    COLLAPSE_SHARE,
    FIGURES,
    LOSSES,
    MIN_TOKEN_SPREAD,
    figure_pixels,
    nearest_neighbours,
    new_figure,
    occupancy_panels,
    plot_attention,
    plot_embeddings_pca,
    plot_embeddings_tsne,
    plot_health,
    plot_losses,
    plot_neighbours,
    plot_occupancy,
    plot_segmentation,
    require_matplotlib,
    save_figure,
    tsne_available,
)
from jointssl_monai.apps.report_run import (
    LEVELS,
    Embeddings,
    RunFolder,
    embed_run,
    find_run,
    read_scalars,
    rebuild_network,
    segmentation_cases,
)
from jointssl_monai.apps.value_report import VALUE_FILE, draw_value, load_value_results, value_table

__all__ = ["CAPTIONS", "collapse_warnings", "make_report"]

logger = logging.getLogger(__name__)


def _summary_rows(run: RunFolder, kwargs, emb: Embeddings | None, epoch_length: int) -> list[tuple[str, str]]:
    last = run.history[-1] if run.history else {}
    rows = [("run folder", run.root.name or str(run.root))]
    if run.history:
        rows.append(("epochs", f"{last['epoch']} ({epoch_length} iterations each)"))
    if run.card:
        rows.append(
            (
                "encoder",
                f"{run.card.get('backbone')}, d_model {run.card.get('d_model')}, "
                f"{run.card.get('num_slices')} slices of {run.card.get('spatial_size')}",
            )
        )
        rows.append(
            ("objectives", f"intra {run.card.get('intra_method')}, inter {run.card.get('inter_method')}")
        )
    if kwargs:
        rows.append(
            (
                "aggregator",
                f"{kwargs['num_layers']} layer(s), {kwargs['attention']} attention, "
                f"{kwargs['heads']} heads of {kwargs['dim_head']}",
            )
        )
        rows.append(("prototypes", f"intra {kwargs['intra_prototypes']}, inter {kwargs['inter_prototypes']}"))
    if emb is not None:
        volumes = sum(i["dims"] == 3 for i in emb.items)
        modalities = Counter(i["modality"] for i in emb.items)
        rows.append(
            (
                "data in this report",
                f"{volumes} volumes ({len(emb.volume_item)} with features), "
                f"{len(emb.items) - volumes} 2D images, {len(emb.slice_emb)} slices; "
                + ", ".join(f"{m} {n}" for m, n in sorted(modalities.items())),
            )
        )
    for key, _ in LOSSES:
        if key in last:
            rows.append((f"last epoch {key}", f"{last[key]:.4f}"))
    for level in LEVELS:
        if f"{level}_clusters_used" in last:
            rows.append(
                (
                    f"last epoch {level} clusters",
                    f"{last[f'{level}_clusters_used']:.1f} in use, largest share "
                    f"{last[f'{level}_largest_share']:.0%}, normalised entropy "
                    f"{last[f'{level}_normalized_entropy']:.3f}",
                )
            )
    return rows


def collapse_warnings(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Collapse signs in the last epoch's averages (the thresholds of ``ClusterHealthHandler``)."""
    if not history:
        return ["no epoch finished: no loss history to judge"]
    last = history[-1]
    out = []
    for level in LEVELS:
        share = last.get(f"{level}_largest_share")
        if share is not None and share >= COLLAPSE_SHARE:
            out.append(
                f"{level} level: the largest cluster holds {share:.0%} of the samples in the last epoch "
                f"({last.get(f'{level}_clusters_used', float('nan')):.1f} clusters in use): collapse "
                "suspected"
            )
    spread = last.get("mask_token_spread")
    if spread is not None and math.isfinite(spread) and spread < MIN_TOKEN_SPREAD:
        out.append(
            f"slice tokens: spread {spread:.1e} < {MIN_TOKEN_SPREAD:g} in the last epoch: the tokens of a "
            "volume barely differ from slice to slice"
        )
    return out


CAPTIONS = {
    "loss_curves.png": (
        "Each loss component per iteration (light, from TensorBoard) and per epoch (points, "
        "runs/pretrain/history.json). A component the run does not train is marked as such."
    ),
    "cluster_health.png": (
        "Collapse diagnostics of the training batches (with the SwAV queue / DeepCluster bank), averaged per "
        "epoch: normalised entropy of the codes, clusters in use and the largest cluster's share per level, "
        "and how much the slice tokens of a volume differ from slice to slice. Dashed: the thresholds of the "
        "collapse warning."
    ),
    "cluster_occupancy.png": (
        "How many samples each prototype holds, largest first, at the end of the run: DeepCluster-v2 "
        "levels from the k-means assignments stored in the checkpoint, SwAV levels from the nearest "
        "prototype of each embedding of this report (projection-head BatchNorm with the statistics of these "
        "embeddings, as in training; not the Sinkhorn codes, which are balanced by construction, so this "
        "can show fewer clusters than the training diagnostics above)."
    ),
    "embedding_pca.png": (
        "Slice-encoder embeddings of every valid slice and 2D image (left, centre) and the volume features Z "
        "of the aggregator (right), projected on their first two principal components."
    ),
    "embedding_tsne.png": "The slice and image embeddings mapped with t-SNE.",
    "nearest_neighbours.png": (
        "Query slices (red frame) and their closest slices or images from other sources by cosine similarity "
        "of the slice embeddings. Slices as the network sees them (intensity-scaled, resized); volume slices "
        "shown in RAS with anterior up."
    ),
    "slice_attention.png": (
        "Attention of the aggregator's last layer over the slices of a few volumes, averaged over heads "
        "(deformable attention: the weights of its sampled points spread onto the slices they read)."
    ),
    "segmentation_overlays.png": (
        "Fine-tuned predictions (red) and reference masks (green outline) on real slices, Dice per case on "
        "the image's own grid."
    ),
    "ssl_value.png": (
        "Every seed's score of the value benchmark (bench_results/ssl_value.json) per task and setting, by "
        "initialisation; grey lines join the SSL and random runs of one seed. The table gives the means and "
        "the paired gain with its 95 % interval."
    ),
}


def _page(title: str, summary, warnings, figures, notes, segmentation_note: str = "", value=None) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1540px;margin:1em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse}td{border:1px solid #ccc;padding:3px 8px;vertical-align:top}"
        "figure{margin:1.5em 0}img{max-width:100%;height:auto;border:1px solid #ddd}"
        ".warn{background:#fde8e8;border:1px solid #d33;padding:.5em 1em}"
        ".ok{background:#e8f6e8;border:1px solid #3a3;padding:.5em 1em}.note{color:#555}</style>",
        "</head><body>",
        f"<h1>{esc(title)}</h1>",
        "<table>",
        *(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in summary),
        "</table>",
    ]
    if warnings:
        parts.append('<div class="warn"><b>Collapse checks</b><ul>')
        parts += [f"<li>{esc(w)}</li>" for w in warnings]
        parts.append("</ul></div>")
    else:
        parts.append('<p class="ok"><b>Collapse checks:</b> no sign of collapse in the last epoch.</p>')
    for name, (heading, caption, (w, h)) in figures.items():
        parts += [
            f'<h2 id="{esc(Path(name).stem)}">{esc(heading)}</h2>',
            f'<figure><img src="{esc(name)}" width="{w}" height="{h}" alt="{esc(heading)}">',
            f"<figcaption>{esc(caption)}</figcaption></figure>",
        ]
    if value is not None:  # the value benchmark's table, under its figure
        header, rows = value
        parts.append("<table><tr>" + "".join(f"<td><b>{esc(h)}</b></td>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    if "segmentation_overlays.png" not in figures:
        parts.append(
            f'<h2 id="segmentation_overlays">Segmentation overlays</h2><p>{esc(segmentation_note)}</p>'
        )
    if notes:
        parts.append("<h2>Notes</h2><ul>")
        parts += [f'<li class="note">{esc(n)}</li>' for n in notes]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def make_report(
    run_dir: str | Path,
    output: str | Path = "report",
    datalist: str | Path | None = None,
    checkpoint: str | Path | None = None,
    max_items: int = 48,
    network: dict | None = None,
    device: str = "auto",
    seed: int = 0,
    slice_policy: str = "center",
    value_json: str | Path | None = None,
) -> Path:
    """Write ``output/index.html`` with the PNG figures beside it and ``output/report.json`` (what was drawn,
    Dice per case, notes); return the page's path.

    Args:
        run_dir: the run's bundle root (``jointssl demo``'s ``runs/demo``).
        output: folder of the report (created).
        datalist: the run's datalist (default ``run_dir/datalist.json``).
        checkpoint: the checkpoint to embed with (default ``checkpoint_final.pt``, else the newest).
        max_items: datalist entries embedded at most (evenly spaced).
        network: ``JointSSLNet`` arguments overriding what is read from the checkpoint (e.g.
            ``{"conv1_t_stride": 1}``).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        seed: seed of t-SNE.
        slice_policy: the run's ``slice_policy`` (not recorded in the run folder); a random one is replaced by
            its deterministic counterpart (``random`` by ``center``, ``random_stride`` by ``stride``).
        value_json: the value benchmark's results (default ``run_dir/bench_results/ssl_value.json`` when it
            exists): a figure of every seed and a table of paired gains close the page.

    Raises:
        MissingPlottingError: matplotlib is not installed.
        FileNotFoundError: ``run_dir`` is not a run folder.
    """
    require_matplotlib()
    from jointssl_monai.data import pretrain_datalist
    from jointssl_monai.utils.checkpoints import safe_load

    start = time.perf_counter()
    run = find_run(run_dir, datalist, checkpoint)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for stale in FIGURES:
        (out / stale).unlink(missing_ok=True)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    notes: list[str] = []
    figures: dict[str, tuple[str, str, tuple[int, int]]] = {}

    def add(name: str, heading: str | None = None) -> None:
        figures[name] = (heading or FIGURES[name][0], CAPTIONS[name], figure_pixels(name))

    ckpt = safe_load(run.checkpoint) if run.checkpoint is not None else {}
    state = ckpt.get("network") if isinstance(ckpt, dict) else None
    trainer = ckpt.get("trainer", {}) if isinstance(ckpt, dict) else {}
    epoch_length = int(
        trainer.get("epoch_length") or (run.history[0].get("iterations") if run.history else 1) or 1
    )
    scalars = read_scalars(run.log_dir)
    if not scalars:
        notes.append("no TensorBoard events in runs/pretrain: curves show the per-epoch history only")

    kwargs: dict[str, Any] = {}
    emb = net = None
    if state is None:
        notes.append("no checkpoint with network weights: no embeddings, occupancy, neighbours or attention")
    else:
        net, kwargs, assumed = rebuild_network(state, run.card, network)
        notes.append(f"network rebuilt from the checkpoint {run.checkpoint}; assumed: {'; '.join(assumed)}")
        if run.datalist is None:
            notes.append("no datalist.json in the run folder (pass --datalist): no embeddings of the data")
        else:
            entries = pretrain_datalist(datalist=str(run.datalist), skip_bad_inputs=True)
            emb = embed_run(
                net,
                entries,
                num_slices=int(run.card.get("num_slices", 64)),
                spatial_size=run.card.get("spatial_size", [128, 128]),
                slice_policy=slice_policy,
                max_items=max_items,
                device=device,
            )
            if len(entries) > len(emb.items) + len(emb.skipped):
                notes.append(f"{len(emb.items)} of {len(entries)} datalist entries embedded (max_items)")
            notes += [f"skipped a bad input: {s}" for s in emb.skipped]
    prototypes = {lv: list(kwargs.get(f"{lv}_prototypes", [])) for lv in LEVELS}

    plot_losses(out / "loss_curves.png", run.history, scalars, epoch_length)
    add("loss_curves.png")
    plot_health(out / "cluster_health.png", run.history, prototypes)
    add("cluster_health.png")
    if emb is not None:
        loss_state = ckpt.get("loss", {}) if isinstance(ckpt, dict) else {}
        plot_occupancy(out / "cluster_occupancy.png", occupancy_panels(emb, loss_state, prototypes))
        add("cluster_occupancy.png")
        plot_embeddings_pca(out / "embedding_pca.png", emb)
        add("embedding_pca.png")
        if not tsne_available():
            notes.append("t-SNE map left out: scikit-learn is not installed (pip install scikit-learn)")
        elif len(emb.slice_emb) < 5:
            notes.append("t-SNE map left out: fewer than 5 slices")
        else:
            plot_embeddings_tsne(out / "embedding_tsne.png", emb, seed)
            add("embedding_tsne.png")
        pairs = nearest_neighbours(emb)
        plot_neighbours(out / "nearest_neighbours.png", emb, pairs)
        add("nearest_neighbours.png")
        shown = plot_attention(out / "slice_attention.png", emb)
        add("slice_attention.png")
        if not shown:
            notes.append("no volume with two or more slices: the attention figure is empty")
    cases, seg_note = segmentation_cases(run.root)
    dice_rows: list[dict[str, Any]] = []
    if cases:
        dice_rows = plot_segmentation(out / "segmentation_overlays.png", cases)
        add(
            "segmentation_overlays.png",
            "Segmentation overlays ("
            + ", ".join(f"{d['case']}: Dice {d['dice']:.3f}" for d in dice_rows)
            + ")",
        )

    value = None
    value_file = Path(value_json) if value_json else run.root / VALUE_FILE
    if value_json or value_file.is_file():
        value_rows = load_value_results(value_file)["rows"]
        fig = new_figure("ssl_value.png")
        draw_value(fig.add_subplot(), value_rows)
        save_figure(fig, out / "ssl_value.png")
        add("ssl_value.png")
        value = value_table(value_rows)

    warnings = collapse_warnings(run.history)
    summary = _summary_rows(run, kwargs, emb, epoch_length)
    title = f"jointssl report: {run.root.resolve().name}"
    page = out / "index.html"
    page.write_text(_page(title, summary, warnings, figures, notes, seg_note, value), encoding="utf-8")
    manifest = {
        "run_dir": str(run.root),
        "checkpoint": str(run.checkpoint) if run.checkpoint else None,
        "figures": [
            {"file": n, "title": t, "width": w, "height": h} for n, (t, _, (w, h)) in figures.items()
        ],
        "warnings": warnings,
        "segmentation": {"note": seg_note, "cases": dice_rows},
        "value": None if value is None else {"header": value[0], "rows": value[1]},
        "notes": notes,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "report.json").write_text(json.dumps(manifest, indent=2))
    logger.info(f"report written to {page} in {manifest['seconds']} s")
    return page
