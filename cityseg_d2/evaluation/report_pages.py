"""The evaluation report's files: PNG plots, a gallery of the worst images, report.json and one self-contained
report.html (plots and gallery embedded), and the same tables and plots in W&B when it is on."""

import base64
import html
import json
import logging
import os

import cv2
import numpy as np
from cityscapesscripts.helpers.labels import id2label
from matplotlib.figure import Figure

from .protocol import INSTANCE_ID_OFFSET
from .report import FALSE_POSITIVES, OUTCOMES, SIZE_RANGES, analyze, collect

logger = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
GALLERY_DIR = "gallery"
# Longest side of each half of a gallery picture.
_GALLERY_SIZE = 960
# BGR outline colours of the gallery: what a detection is, and a missed instance.
_OUTCOME_COLOURS = {
    "true positive": (80, 200, 60),
    "duplicate": (0, 140, 255),
    "wrong class": (255, 0, 255),
    "poor localisation": (0, 215, 255),
    "background": (40, 40, 230),
    "ignored": (160, 160, 160),
}
_MISSED_COLOUR = (40, 40, 230)


def _legend(ax, **options):
    if ax.get_legend_handles_labels()[0]:  # no curve (no predictions of any class): no legend
        ax.legend(**options)


def _save(figure, path):
    figure.savefig(path, dpi=100)
    return path


def plot_pr_curves_at_50(report, path):
    figure = Figure(figsize=(7, 5.5), tight_layout=True)
    ax = figure.subplots()
    for name, curves in report["pr_curves"].items():
        if "0.50" in curves:
            ap50 = report["per_class"][name]["AP50"]
            ax.step(curves["0.50"]["recall"], curves["0.50"]["precision"], where="post", label=f"{name} ({ap50:.1f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-recall at IoU 0.5 (AP50)")
    _legend(ax, fontsize=8)
    return _save(figure, path)


def plot_pr_curves_by_iou(report, path):
    names = report["classes"]
    columns = 4
    rows = -(-len(names) // columns)
    figure = Figure(figsize=(4 * columns, 3.3 * rows), tight_layout=True)
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for ax, name in zip(axes, names):
        curves = report["pr_curves"][name]
        for t, threshold in enumerate(report["iou_thresholds"]):
            key = f"{threshold:.2f}"
            if key in curves:
                colour = (t / max(len(report["iou_thresholds"]) - 1, 1), 0.3, 1 - t / len(report["iou_thresholds"]))
                ax.step(curves[key]["recall"], curves[key]["precision"], where="post", color=colour, lw=0.9, label=key)
        ap = report["per_class"][name]["AP"]
        ax.set(xlim=(0, 1), ylim=(0, 1.02), title=f"{name}: AP {'-' if ap is None else f'{ap:.1f}'}")
        ax.set_xlabel("recall", fontsize=8)
        ax.set_ylabel("precision", fontsize=8)
    _legend(axes[0], title="IoU", fontsize=6, title_fontsize=7)
    for ax in axes[len(names) :]:
        ax.axis("off")
    return _save(figure, path)


def plot_ap_vs_iou(report, path):
    figure = Figure(figsize=(7, 5), tight_layout=True)
    ax = figure.subplots()
    thresholds = report["iou_thresholds"]
    for name in report["classes"]:
        values = [np.nan if v is None else v for v in report["ap_by_iou"][name]]
        ax.plot(thresholds, values, marker=".", lw=1, label=name)
    ax.plot(thresholds, report["ap_by_iou"]["mean"], color="black", lw=2.5, label=f"mean (AP {report['AP']:.1f})")
    ax.set(xlabel="IoU threshold", ylabel="AP (%)", ylim=(0, 100), title="AP as a function of the IoU threshold")
    ax.legend(fontsize=8)
    return _save(figure, path)


def plot_ap_by_size(report, path):
    names = [*report["classes"], "mean"]
    figure = Figure(figsize=(max(7, 0.9 * len(names)), 4.5), tight_layout=True)
    ax = figure.subplots()
    width = 0.8 / len(SIZE_RANGES)
    for i, (size, values) in enumerate(report["ap_by_size"].items()):
        heights = [values["per_class"][n] for n in report["classes"]] + [values["AP"]]
        heights = [0 if h is None or np.isnan(h) else h for h in heights]
        ax.bar(np.arange(len(names)) + (i - 1) * width, heights, width, label=f"{size} ({values['instances']})")
    ax.set_xticks(np.arange(len(names)), names, rotation=30)
    ax.set(ylabel="AP (%)", title="AP by instance size (ground-truth instances in brackets)")
    ax.legend(fontsize=8)
    return _save(figure, path)


def plot_confusion(report, path):
    counts = np.array(report["confusion"]["counts"])
    rows, columns = report["confusion"]["rows"], report["confusion"]["columns"]
    figure = Figure(figsize=(1.0 + 0.75 * len(columns), 1.2 + 0.6 * len(rows)), tight_layout=True)
    ax = figure.subplots()
    ax.imshow(np.log1p(counts), cmap="Blues")
    for (r, c), value in np.ndenumerate(counts):
        ax.text(
            c,
            r,
            str(value),
            ha="center",
            va="center",
            fontsize=8,
            color="black" if value < counts.max() / 2 else "white",
        )
    ax.set_xticks(range(len(columns)), columns, rotation=40, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set(
        xlabel="what the detection covers (IoU > 0.5)",
        ylabel="predicted class",
        title=f"Detections scoring >= {report['score_threshold']}",
    )
    return _save(figure, path)


def plot_false_positives(report, path):
    names = report["classes"]
    figure = Figure(figsize=(max(7, 0.9 * len(names)), 4.5), tight_layout=True)
    ax = figure.subplots()
    bottom = np.zeros(len(names))
    for kind in FALSE_POSITIVES:
        heights = np.array([report["detections"][n][kind] for n in names])
        ax.bar(names, heights, bottom=bottom, label=kind)
        bottom += heights
    ax.tick_params(axis="x", rotation=30)
    ax.set(ylabel="false positives", title=f"False positives at IoU 0.5, score >= {report['score_threshold']}")
    ax.legend(fontsize=8)
    return _save(figure, path)


def plot_false_negatives(report, path):
    figure = Figure(figsize=(11, 4.2), tight_layout=True)
    axes = figure.subplots(1, 2)
    negatives = report["false_negatives"]
    for ax, key, title in ((axes[0], "by_size", "size"), (axes[1], "by_visibility", "visible part")):
        buckets = negatives[key]
        rates = [100 * b["missed"] / b["instances"] if b["instances"] else 0 for b in buckets.values()]
        bars = ax.bar(list(buckets), rates, color="tab:red")
        for bar, b in zip(bars, buckets.values()):
            ax.annotate(
                f"{b['missed']}/{b['instances']}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set(ylabel="missed (%)", ylim=(0, 105), title=f"Missed instances by {title}")
    if negatives["visibility_unknown"]:
        axes[1].set_xlabel(f"{negatives['visibility_unknown']} instances without polygons left out", fontsize=8)
    return _save(figure, path)


def _fit(image):
    scale = _GALLERY_SIZE / max(image.shape[:2])
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image


def _draw(canvas, mask, fill, outline, text):
    """Blend a mask's fill into canvas (BGR), outline it and write text at its top-left."""
    mask = cv2.resize(mask.astype(np.uint8), canvas.shape[1::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
    if not mask.any():
        return
    canvas[mask] = (0.55 * canvas[mask] + 0.45 * np.array(fill)).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(canvas, contours, -1, outline, 2)
    ys, xs = np.nonzero(mask)
    cv2.putText(canvas, text, (int(xs.min()), max(int(ys.min()) - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, outline, 1)


def render_gallery_image(data, index, outcome, found, score_threshold, path):
    """Ground truth (left: missed instances outlined in red) and detections scoring >= score_threshold (right,
    outlined by what they are) of the image at `index`, side by side, as a JPEG (a photo: a PNG is 5x larger)."""
    info = data.images[index]
    image = cv2.imread(info.file_name, cv2.IMREAD_COLOR)
    regions_image = cv2.imread(info.gt_path, cv2.IMREAD_UNCHANGED)
    if image is None:
        image = np.zeros((*regions_image.shape, 3), np.uint8)
    base = _fit(image)
    truth, detections = base.copy(), base.copy()
    label_ids = data.classes.label_ids
    for position in np.flatnonzero(data.gt_image == index):
        region_id = data.gt_region[position]
        label = id2label[int(region_id // INSTANCE_ID_OFFSET)]
        outline, text = ((255, 255, 255), label.name) if found[position] else (_MISSED_COLOUR, f"{label.name} missed")
        _draw(truth, regions_image == region_id, label.color[::-1], outline, text)
    predictions = info.encoded.decode()
    first = np.searchsorted(data.image, index)
    for offset, position in enumerate(info.kept):
        p = first + offset
        if data.stats.scores[p] < score_threshold:
            continue
        name = data.classes.names[data.stats.pred_classes[p]]
        kind = OUTCOMES[outcome[p]]
        fill = id2label[label_ids[data.stats.pred_classes[p]]].color[::-1]
        _draw(
            detections,
            predictions.masks[position],
            fill,
            _OUTCOME_COLOURS[kind],
            f"{name} {data.stats.scores[p]:.2f} {kind}",
        )
    gap = np.full((base.shape[0], 8, 3), 255, np.uint8)
    cv2.imwrite(path, np.hstack([truth, gap, detections]), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path


def _embedded(path):
    kind = "jpeg" if path.endswith(".jpg") else "png"
    with open(path, "rb") as f:
        return f"data:image/{kind};base64,{base64.b64encode(f.read()).decode('ascii')}"


def _table(header, rows):
    def cell(value):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "-"
        return f"{value:.2f}" if isinstance(value, float) else html.escape(str(value))

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def report_tables(report):
    """{title: (header, rows)}: the tables of the page, and of W&B."""
    names = report["classes"]
    thresholds = [f"AP@{t:.2f}" for t in report["iou_thresholds"]]
    per_class = [
        (n, report["per_class"][n]["AP"], report["per_class"][n]["AP50"], *report["ap_by_iou"][n]) for n in names
    ]
    per_class.append(("mean", report["AP"], report["AP50"], *report["ap_by_iou"]["mean"]))
    sizes = [
        (size, v["instances"], v["AP"], v["AP50"], *(v["per_class"][n] for n in names))
        for size, v in report["ap_by_size"].items()
    ]
    negatives = report["false_negatives"]
    missed = [
        (group, bucket, b["missed"], b["instances"])
        for group, key in (("class", "per_class"), ("size", "by_size"), ("visible part", "by_visibility"))
        for bucket, b in negatives[key].items()
    ]
    confusion = report["confusion"]
    return {
        "AP per class (official protocol)": (["class", "AP", "AP50", *thresholds], per_class),
        "AP by instance size": (["size", "instances", "AP", "AP50", *names], sizes),
        "Detections at IoU 0.5": (["class", *OUTCOMES], [(n, *report["detections"][n].values()) for n in names]),
        "Missed instances at IoU 0.5": (["by", "group", "missed", "instances"], missed),
        "Confusion of the detections": (
            ["predicted \\ covers", *confusion["columns"]],
            [(r, *counts) for r, counts in zip(confusion["rows"], confusion["counts"])],
        ),
    }


def write_html(report, figures, gallery, path):
    """One page with every table, plot and gallery picture embedded (no other file needed to read it)."""
    parts = [
        f"<h1>Evaluation report: {html.escape(report['dataset'])}</h1>",
        f"<p>{report['images']} images, {report['predictions']} predictions, {report['ground_truth_instances']} "
        f"ground-truth instances. AP {report['AP']:.2f}, AP50 {report['AP50']:.2f} (official Cityscapes protocol). "
        f"Detections, confusion and misses: IoU 0.5, detections scoring >= {report['score_threshold']}; sizes in "
        f"pixels: {', '.join(f'{k} {v[0]}-{v[1]}' for k, v in SIZE_RANGES.items())}; visible part: visible pixels "
        "over the pixels of the instance's own polygon.</p>",
    ]
    for title, (header, rows) in report_tables(report).items():
        parts.append(f"<h2>{html.escape(title)}</h2>{_table(header, rows)}")
    for title, figure in figures.items():
        parts.append(f"<h2>{html.escape(title)}</h2><img src='{_embedded(figure)}'>")
    if gallery:
        legend = ", ".join(
            f"<span style='color:rgb{tuple(colour[::-1])}'>{kind}</span>" for kind, colour in _OUTCOME_COLOURS.items()
        )
        parts.append(
            "<h2>Worst images (most false positives and missed instances)</h2><p>Left: ground truth, missed instances "
            f"outlined in red. Right: detections scoring >= {report['score_threshold']}, outlined by what they are: "
            f"{legend}.</p>"
        )
    for item, picture in zip(report["worst_images"], gallery):
        parts.append(
            f"<h3>{html.escape(item['image_id'])}: {item['false_positives']} false positives, "
            f"{item['false_negatives']} missed</h3><img src='{_embedded(picture)}'>"
        )
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1em}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}"
    )
    with open(path, "w") as f:
        f.write(
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Evaluation report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
        )
    return path


PLOTS = {
    "Precision-recall at IoU 0.5": ("pr_iou50.png", plot_pr_curves_at_50),
    "Precision-recall over IoU 0.5:0.95": ("pr_iou50_95.png", plot_pr_curves_by_iou),
    "AP as a function of the IoU threshold": ("ap_vs_iou.png", plot_ap_vs_iou),
    "AP by instance size": ("ap_by_size.png", plot_ap_by_size),
    "Confusion of the detections": ("confusion.png", plot_confusion),
    "False positives": ("false_positives.png", plot_false_positives),
    "Missed instances": ("false_negatives.png", plot_false_negatives),
}


def write_report(predictions, out_dir, dataset_name=None, score_threshold=0.5, gallery_size=6):
    """Analyse a PredictionsFile and write the report into out_dir. Returns (report dict, {title: PNG path},
    [gallery PNG paths], HTML path)."""
    data = collect(predictions, dataset_name)
    report, outcome, found = analyze(data, score_threshold, gallery_size)
    os.makedirs(os.path.join(out_dir, GALLERY_DIR), exist_ok=True)
    figures = {title: plot(report, os.path.join(out_dir, file)) for title, (file, plot) in PLOTS.items()}
    positions = {info.image_id: i for i, info in enumerate(data.images)}
    gallery = [
        render_gallery_image(
            data,
            positions[item["image_id"]],
            outcome,
            found,
            score_threshold,
            os.path.join(out_dir, GALLERY_DIR, f"{item['image_id']}.jpg"),
        )
        for item in report["worst_images"]
    ]
    with open(os.path.join(out_dir, REPORT_JSON), "w") as f:
        json.dump(report, f, indent=1)
    page = write_html(report, figures, gallery, os.path.join(out_dir, REPORT_HTML))
    logger.info(f"evaluation report of {report['images']} images written to {page}")
    return report, figures, gallery, page


def log_report_to_wandb(run, report, figures, gallery):
    """The report's tables ("report/tables/<title>"), plots ("report/plots/<title>"), gallery ("report/worst
    images") and AP (summary "report/AP", "report/AP50") in a W&B run."""
    import wandb

    logged = {
        f"report/tables/{title}": wandb.Table(columns=[str(h) for h in header], data=[list(r) for r in rows])
        for title, (header, rows) in report_tables(report).items()
    }
    logged.update({f"report/plots/{title}": wandb.Image(path) for title, path in figures.items()})
    if gallery:
        logged["report/worst images"] = [wandb.Image(p, caption=os.path.basename(p)) for p in gallery]
    run.log(logged)
    run.summary["report/AP"] = report["AP"]
    run.summary["report/AP50"] = report["AP50"]
