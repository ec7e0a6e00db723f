"""The figures of ``jointssl report``: every figure has a fixed size (:data:`FIGURES`), drawn with
matplotlib's object API (no global state), imported only when a report is made (the ``report`` extra)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from jointssl_monai.apps.report_run import LEVELS, Embeddings, dice, load_ras

#: What to install when matplotlib is missing.
REPORT_EXTRA = 'pip install "jointssl-monai[report]"'
#: Resolution of every figure; sizes below are in inches, so a figure is ``inches * DPI`` pixels.
DPI = 100
#: File name: (title, size in inches). Every figure has this exact size, whatever it shows.
FIGURES: dict[str, tuple[str, tuple[int, int]]] = {
    "loss_curves.png": ("Loss per component", (12, 7)),
    "cluster_health.png": ("Code entropy, clusters in use, largest cluster, slice-token spread", (12, 7)),
    "cluster_occupancy.png": ("Cluster occupancy", (12, 6)),
    "embedding_pca.png": ("Embedding map (PCA)", (15, 5)),
    "embedding_tsne.png": ("Embedding map (t-SNE)", (12, 5)),
    "nearest_neighbours.png": ("Nearest-neighbour slices", (12, 8)),
    "slice_attention.png": ("Attention over slices", (12, 4)),
    "segmentation_overlays.png": ("Segmentation overlays", (12, 6)),
    "ssl_value.png": ("Does the pretraining help? (value benchmark)", (12, 6)),
}
LOSSES = (
    ("loss", "total (weighted sum)"),
    ("loss_intra", "intra: slice/image clustering"),
    ("loss_inter", "inter: volume clustering"),
    ("loss_mask", "masked slice modelling"),
)

__all__ = [
    "COLLAPSE_SHARE",
    "DPI",
    "FIGURES",
    "LOSSES",
    "MIN_TOKEN_SPREAD",
    "REPORT_EXTRA",
    "MissingPlottingError",
    "figure_pixels",
    "nearest_neighbours",
    "new_figure",
    "occupancy_panels",
    "plot_attention",
    "plot_embeddings_pca",
    "plot_embeddings_tsne",
    "plot_health",
    "plot_losses",
    "plot_neighbours",
    "plot_occupancy",
    "plot_segmentation",
    "require_matplotlib",
    "save_figure",
    "tsne_available",
]

#: The thresholds of ``ClusterHealthHandler`` (its defaults): largest share and token spread of a collapse.
COLLAPSE_SHARE = 0.9
MIN_TOKEN_SPREAD = 1e-3


class MissingPlottingError(ImportError):
    """matplotlib is not installed (the ``report`` extra)."""


def require_matplotlib() -> None:
    """Raise :class:`MissingPlottingError` with the install line when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise MissingPlottingError(
            f"jointssl report needs matplotlib, which is not installed: {REPORT_EXTRA}"
        ) from err


def figure_pixels(name: str) -> tuple[int, int]:
    """Width and height in pixels of the figure file ``name`` (a key of :data:`FIGURES`)."""
    w, h = FIGURES[name][1]
    return w * DPI, h * DPI


def new_figure(name: str):
    from matplotlib.figure import Figure

    return Figure(figsize=FIGURES[name][1], dpi=DPI, layout="constrained")


def save_figure(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI, facecolor="white")


def _empty(ax, text: str) -> None:
    ax.text(
        0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10, color="0.35", transform=ax.transAxes
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _series(ax, key: str, label: str, history, scalars, epoch_length: int, color) -> bool:
    drawn = False
    if key in scalars:
        steps, values = scalars[key]
        ax.plot(steps / max(epoch_length, 1), values, color=color, alpha=0.3, lw=0.8)
        drawn = True
    epochs = [(e["epoch"], e[key]) for e in history if key in e and e[key] is not None]
    epochs = [(x, y) for x, y in epochs if math.isfinite(y)]
    if epochs:
        x, y = zip(*epochs, strict=True)
        ax.plot(x, y, "o-", color=color, ms=3.5, lw=1.5, label=label)
        drawn = True
    return drawn


def plot_losses(path: Path, history, scalars, epoch_length: int) -> None:
    fig = new_figure(path.name)
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, title) in zip(axes, LOSSES, strict=True):
        ax.set_title(f"{key}: {title}", fontsize=11)
        if _series(ax, key, "epoch mean", history, scalars, epoch_length, "C0"):
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.plot([], [], color="C0", alpha=0.3, lw=0.8, label="per iteration")
            ax.legend(fontsize=8)
        else:
            _empty(ax, "not used in this run")
    save_figure(fig, path)


def plot_health(path: Path, history, prototypes: Mapping[str, list[int]]):
    # the per-epoch averages of every iteration (history.json); TensorBoard holds only the epoch's last check
    scalars: dict = {}
    epoch_length = 1
    fig = new_figure(path.name)
    axes = fig.subplots(2, 2).ravel()
    panels = [
        ("normalized_entropy", "normalised code entropy (1 = even use of the prototypes)"),
        ("clusters_used", "clusters in use"),
        ("largest_share", "largest cluster's share"),
    ]
    for ax, (stat, title) in zip(axes, panels, strict=False):
        ax.set_title(title, fontsize=11)
        drawn = False
        for c, level in enumerate(LEVELS):
            k = ", ".join(map(str, prototypes.get(level, []))) or "?"
            drawn |= _series(
                ax, f"{level}_{stat}", f"{level} (K = {k})", history, scalars, epoch_length, f"C{c}"
            )
        if not drawn:
            _empty(ax, "not logged in this run")
            continue
        if stat == "largest_share":
            ax.axhline(COLLAPSE_SHARE, color="C3", ls="--", lw=1, label="collapse warning")
            ax.set_ylim(0, 1.05)
        if stat == "normalized_entropy":
            ax.set_ylim(0, 1.05)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[3]
    ax.set_title("slice-token spread (0 = every slice of a volume has the same token)", fontsize=11)
    if _series(ax, "mask_token_spread", "epoch mean", history, scalars, epoch_length, "C2"):
        ax.axhline(MIN_TOKEN_SPREAD, color="C3", ls="--", lw=1, label="collapse warning")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    else:
        _empty(ax, "not logged in this run")
    save_figure(fig, path)


def occupancy_panels(emb: Embeddings, loss_state: Mapping[str, torch.Tensor], prototypes):
    """Per level and prototype head: ``(level, head, counts, source)``. DeepCluster-v2 levels use the
    k-means assignments stored in the checkpoint (what training used); others the argmax of the prototype
    scores of this report's embeddings."""
    panels = []
    for level in LEVELS:
        stored = loss_state.get(f"{level}_loss.assignments")
        for h, k in enumerate(prototypes.get(level, [])):
            if stored is not None and stored.ndim == 2 and h < stored.shape[0]:
                codes = stored[h][stored[h] >= 0].cpu().numpy()
                source = f"k-means assignments in the checkpoint, {len(codes)} samples"
            else:
                codes = (emb.intra_codes if level == "intra" else emb.inter_codes)[h]
                what = "slices and images" if level == "intra" else "volumes"
                source = f"nearest prototype of {len(codes)} {what} of this report"
            panels.append((level, h, np.bincount(codes.astype(int), minlength=k)[:k], source))
    return panels


def plot_occupancy(path: Path, panels) -> None:
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(path.name)
    levels = [lv for lv in LEVELS if any(p[0] == lv for p in panels)] or ["intra"]
    cols = max([sum(p[0] == lv for p in panels) for lv in levels] + [1])
    cols = min(cols, 3)
    axes = np.atleast_2d(fig.subplots(len(levels), cols, squeeze=False))
    for r, level in enumerate(levels):
        mine = [p for p in panels if p[0] == level][:cols]
        for c in range(cols):
            ax = axes[r, c]
            if c >= len(mine):
                ax.axis("off")
                continue
            _, h, counts, source = mine[c]
            total = max(int(counts.sum()), 1)
            order = np.sort(counts)[::-1]
            ax.bar(np.arange(1, len(order) + 1), order, width=1.0, color=f"C{r}", lw=0)
            used = int((counts > 0).sum())
            ax.set_title(
                f"{level}, head {h + 1}: {used} of {len(counts)} clusters in use, largest "
                f"{order[0] / total:.0%}\n({source})",
                fontsize=9,
            )
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("cluster, largest first")
            ax.set_ylabel("members")
            ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def _pca(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = x - x.mean(axis=0, keepdims=True)
    if len(x) < 2:
        return np.zeros((len(x), 2)), np.zeros(2)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    coords = x @ vt[:2].T
    coords *= np.sign(coords[np.abs(coords).argmax(axis=0), range(coords.shape[1])] + 1e-12)
    var = s**2 / max(float((s**2).sum()), 1e-12)
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords, np.pad(var[:2], (0, max(0, 2 - len(var[:2]))))


def _colours(labels: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(set(labels)) <= 10 else "tab20"]
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(sorted(set(labels)))}


def _scatter(ax, coords, emb: Embeddings, rows: np.ndarray, by: str) -> None:
    labels = [emb.items[i][by] for i in rows]
    # one colour per value over all items, so that a modality keeps its colour from panel to panel
    colours = {k: v for k, v in _colours([item[by] for item in emb.items]).items() if k in set(labels)}
    dims = np.array([emb.items[i]["dims"] for i in rows])
    for lab, colour in colours.items():
        sel = np.array([x == lab for x in labels])
        for d, marker, size in ((3, "o", 14), (2, "^", 60)):
            pick = sel & (dims == d)
            if pick.any():
                ax.scatter(
                    coords[pick, 0],
                    coords[pick, 1],
                    s=size,
                    marker=marker,
                    color=colour,
                    edgecolors="k" if d == 2 else "none",
                    linewidths=0.5,
                )
        ax.scatter([], [], color=colour, label=lab)
    if len(colours) <= 14:
        title = "source" if by == "name" else by
        ax.legend(fontsize=7, loc="best", framealpha=0.8, title=title, title_fontsize=7)


def plot_embeddings_pca(path: Path, emb: Embeddings) -> None:
    fig = new_figure(path.name)
    axes = fig.subplots(1, 3)
    coords, var = _pca(emb.slice_emb)
    for ax, by in zip(axes[:2], ("modality", "name"), strict=True):
        _scatter(ax, coords, emb, emb.slice_item, by)
        what = "modality" if by == "modality" else "source"
        ax.set_title(f"slices (o) and 2D images (^) by {what}", fontsize=11)
        ax.set_xlabel(f"PC 1 ({var[0]:.0%})")
        ax.set_ylabel(f"PC 2 ({var[1]:.0%})")
    ax = axes[2]
    ax.set_title("volume features Z by modality", fontsize=11)
    if len(emb.volume_item) >= 2:
        vcoords, vvar = _pca(emb.volume_emb)
        _scatter(ax, vcoords, emb, emb.volume_item, "modality")
        for (x, y), k in zip(vcoords, emb.volume_item, strict=True):
            ax.annotate(emb.items[k]["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"PC 1 ({vvar[0]:.0%})")
        ax.set_ylabel(f"PC 2 ({vvar[1]:.0%})")
    else:
        _empty(ax, "fewer than two volumes: nothing to map")
    save_figure(fig, path)


def tsne_available() -> bool:
    try:
        import sklearn.manifold  # noqa: F401
    except ImportError:
        return False
    return True


def plot_embeddings_tsne(path: Path, emb: Embeddings, seed: int = 0) -> None:
    from sklearn.manifold import TSNE

    n = len(emb.slice_emb)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    # one OpenMP thread: beside torch's (idle, spinning) threads, more made t-SNE several times slower
    with threadpool_limits(limits=1):
        tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed)
        coords = tsne.fit_transform(emb.slice_emb)
    fig = new_figure(path.name)
    axes = fig.subplots(1, 2)
    for ax, by in zip(axes, ("modality", "name"), strict=True):
        _scatter(ax, coords, emb, emb.slice_item, by)
        what = "modality" if by == "modality" else "source"
        ax.set_title(
            f"slices (o) and 2D images (^) by {what}, t-SNE (perplexity {perplexity:.0f})", fontsize=10
        )
        ax.set_xticks([])
        ax.set_yticks([])
    save_figure(fig, path)


def _show_slice(ax, picture: np.ndarray, dims: int) -> None:
    # (H, W) in MONAI's order: axial slices of RAS volumes are (X, Y), 2D images (columns, rows)
    ax.imshow(picture.T, cmap="gray", vmin=0, vmax=255, origin="lower" if dims == 3 else "upper")
    ax.set_xticks([])
    ax.set_yticks([])


def nearest_neighbours(emb: Embeddings, queries: int = 4, k: int = 5) -> list[tuple[int, list[tuple]]]:
    """Query rows (the middle slice of the largest volumes, then 2D images) with their ``k`` closest rows
    (cosine similarity of slice embeddings) from other sources: ``[(query, [(row, similarity), ...])]``."""
    x = F.normalize(torch.as_tensor(emb.slice_emb), dim=1)
    order = sorted(range(len(emb.items)), key=lambda i: (-emb.items[i]["dims"], -emb.items[i]["slices"], i))
    picks = []
    for item in order[:queries]:
        rows = np.flatnonzero(emb.slice_item == item)
        picks.append(int(rows[len(rows) // 2]))
    out = []
    for q in picks:
        sim = (x @ x[q]).numpy()
        others = np.flatnonzero(emb.slice_item != emb.slice_item[q])
        best = others[np.argsort(-sim[others], kind="stable")[:k]]
        out.append((q, [(int(r), float(sim[r])) for r in best]))
    return out


def _row_label(emb: Embeddings, row: int) -> str:
    item = emb.items[emb.slice_item[row]]
    return f"{item['name']} (2D)" if item["dims"] == 2 else f"{item['name']}, slice {emb.slice_pos[row]}"


def plot_neighbours(path: Path, emb: Embeddings, pairs, k: int = 5) -> None:
    fig = new_figure(path.name)
    rows = max(len(pairs), 1)
    axes = np.atleast_2d(fig.subplots(rows, k + 1, squeeze=False))
    if not pairs or all(not n for _, n in pairs):
        for ax in axes.ravel():
            ax.axis("off")
        _empty(axes[0, 0], "a single source: no neighbours from other sources")
    for r, (q, neighbours) in enumerate(pairs):
        ax = axes[r, 0]
        _show_slice(ax, emb.thumbs[q], emb.items[emb.slice_item[q]]["dims"])
        ax.set_title(f"query: {_row_label(emb, q)}", fontsize=8, color="C3")
        for side in ax.spines.values():
            side.set_edgecolor("C3")
            side.set_linewidth(2.5)
        for c in range(k):
            ax = axes[r, c + 1]
            if c >= len(neighbours):
                ax.axis("off")
                continue
            row, sim = neighbours[c]
            _show_slice(ax, emb.thumbs[row], emb.items[emb.slice_item[row]]["dims"])
            ax.set_title(f"{_row_label(emb, row)}\ncosine {sim:.3f}", fontsize=8)
    save_figure(fig, path)


def plot_attention(path: Path, emb: Embeddings, count: int = 4) -> list[str]:
    fig = new_figure(path.name)
    chosen = sorted(
        (k for k, a in emb.attention.items() if a.shape[-1] >= 2), key=lambda k: (-emb.items[k]["slices"], k)
    )[:count]
    if not chosen:
        ax = fig.subplots()
        _empty(ax, "no volume with two or more slices: no attention over slices to show")
        save_figure(fig, path)
        return []
    from matplotlib.ticker import MaxNLocator

    axes = np.atleast_1d(fig.subplots(1, count))
    for ax in axes[len(chosen) :]:
        ax.axis("off")
    for ax, k in zip(axes, chosen, strict=False):
        maps = emb.attention[k]  # (layers, heads, L, L)
        layer = maps[-1].mean(axis=0)
        im = ax.imshow(layer, cmap="viridis", vmin=0, interpolation="nearest")
        ax.set_title(
            f"{emb.items[k]['name']}\n{layer.shape[0]} slices, layer {maps.shape[0]} of {maps.shape[0]}, "
            f"{maps.shape[1]} heads",
            fontsize=8,
        )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("key slice")
        ax.set_ylabel("query slice")
        fig.colorbar(im, ax=ax, shrink=0.7)
    save_figure(fig, path)
    return [emb.items[k]["name"] for k in chosen]


def plot_segmentation(path: Path, cases: list[dict[str, Any]], columns: int = 3) -> list[dict[str, Any]]:
    """Predicted mask (red) and reference (green outline) over three axial slices per case; Dice per case on
    the image's own grid. Returns ``[{"case", "dice", "slices"}]``."""
    from matplotlib.colors import ListedColormap

    red = ListedColormap(["red"])
    fig = new_figure(path.name)
    shown = cases[:2]
    axes = np.atleast_2d(fig.subplots(len(shown), columns, squeeze=False))
    results = []
    for r, case in enumerate(shown):
        (image, spacing), (label, _), (pred, _) = (
            load_ras(case[k]) for k in ("image", "label", "prediction")
        )
        if not image.shape == label.shape == pred.shape:
            raise ValueError(
                f"{case['name']}: image {image.shape}, label {label.shape} and prediction {pred.shape} differ"
            )
        score = dice(pred, label)
        z_with = np.flatnonzero((label > 0).any(axis=(0, 1)))
        if len(z_with) == 0:
            z_with = np.arange(image.shape[2])
        zs = [int(z_with[int(q * (len(z_with) - 1))]) for q in np.linspace(0.25, 0.75, columns)]
        low, high = np.percentile(image, [1, 99])
        for c, z in enumerate(zs):
            ax = axes[r, c]
            aspect = float(spacing[1] / spacing[0])  # rows are Y, columns X: true proportions on screen
            ax.imshow(image[..., z].T, cmap="gray", vmin=low, vmax=max(high, low + 1e-6), origin="lower",
                      aspect=aspect)  # fmt: skip
            overlay = np.ma.masked_where(pred[..., z].T <= 0, np.ones_like(pred[..., z].T, dtype=float))
            ax.imshow(overlay, cmap=red, alpha=0.45, origin="lower", vmin=0, vmax=1, aspect=aspect)
            if (label[..., z] > 0).any():
                ax.contour((label[..., z] > 0).T.astype(float), levels=[0.5], colors="lime", linewidths=1)
            ax.set_title(f"{case['name']}, axial slice {z}: Dice {score:.3f}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        results.append({"case": case["name"], "dice": score, "slices": zs})
    save_figure(fig, path)
    return results
