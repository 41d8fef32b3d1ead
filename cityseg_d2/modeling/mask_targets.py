"""Mask R-CNN mask targets rasterised with tensor operations on the model's device, equal to detectron2's.

detectron2 rasterises each ROI's polygons on the CPU with pycocotools, one ROI at a time
(`PolygonMasks.crop_and_resize`), in the training process. Here the polygons of every instance are packed once
into a padded tensor of edges (`pack_polygon_edges`, in the data workers when the fast data path is on) and the
M x M targets of all ROIs are computed at once. The arithmetic follows detectron2's `rasterize_polygons_within_box` and pycocotools'
`rleFrPoly` step by step (float32 box ratios, float64 polygon coordinates, vertices rounded to a 1/5-pixel
grid, the traced edges' column crossings, even-odd fill of each polygon, union of an instance's polygons), so the
targets equal detectron2's bit for bit, not just approximately.
"""

import torch

# pycocotools traces polygon edges on a grid this many times finer than the mask's pixels.
_UPSAMPLE = 5
# Elements of a chunk's largest temporaries ((ROIs, polygons, vertices, M) float64 and (ROIs, polygons, M, M + 1)
# counts): about 0.5 GB of temporaries per chunk, a few chunks for a batch of 8 Cityscapes images.
_CHUNK_ELEMENTS = 1 << 23


def concat_padded(edge_tensors):
    """Concatenate (N_i, P_i, V_i, 4) edge tensors along N, zero-padding P and V to the largest."""
    polygons = max(t.shape[1] for t in edge_tensors)
    vertices = max(t.shape[2] for t in edge_tensors)
    return torch.cat(
        [torch.nn.functional.pad(t, (0, 0, 0, vertices - t.shape[2], 0, polygons - t.shape[1])) for t in edge_tensors]
    )


def rasterize_polygons_in_boxes(edges, boxes, mask_size):
    """(R, M, M) bool: ROI r's polygons `edges[r]` rasterised in `boxes[r]` at M x M, as detectron2's
    PolygonMasks.crop_and_resize does it.

    edges: (R, P, V, 4) from pack_polygon_edges, indexed by each ROI's instance; boxes: (R, 4) float32 x0, y0,
    x1, y1 in the same image coordinates."""
    num_rois = boxes.shape[0]
    out = torch.empty((num_rois, mask_size, mask_size), dtype=torch.bool, device=boxes.device)
    if num_rois == 0:
        return out
    vertices = _grid_vertices(edges.to(device=boxes.device, dtype=torch.float64), boxes.to(torch.float32), mask_size)
    polygons, edges = vertices.shape[1], vertices.shape[2]
    per_roi = polygons * edges * mask_size + polygons * mask_size * (
        mask_size + 1
    )  # per-edge and per-pixel temporaries
    step = max(1, _CHUNK_ELEMENTS // per_roi)
    for start in range(0, num_rois, step):
        stop = min(start + step, num_rois)
        out[start:stop] = _fill(vertices[start:stop], mask_size)
    return out


def _grid_vertices(edges, boxes, mask_size):
    """Edge end points in pycocotools' integer tracing grid: shifted to the box and scaled to the mask as
    detectron2 does (float32 box sides and ratios, float64 coordinates), then (int)(5 * v + 0.5)."""
    sides = boxes[:, 2:] - boxes[:, :2]  # float32, as numpy computes box[2] - box[0] on the float32 box
    large = sides.to(torch.float64) >= 0.1  # max(side, 0.1) in Python: the float32 side unless 0.1 is larger
    ratios = torch.where(
        large, (mask_size / sides).to(torch.float64), torch.full_like(large, mask_size / 0.1, dtype=torch.float64)
    )
    origin = boxes[:, :2].to(torch.float64).repeat(1, 2)[:, None, None, :]
    scaled = (edges - origin) * ratios.repeat(1, 2)[:, None, None, :]
    return torch.trunc(_UPSAMPLE * scaled + 0.5)


def _fill(vertices, mask_size):
    """Even-odd fill of each traced polygon, then their union. pycocotools toggles pixel (row y, column x) for
    every crossing of the traced boundary with the line through column x's centre (grid u = 5x + 2 -> 5x + 3)
    at a grid row v <= 5y + 2. Crossings are counted with difference arrays: O(edges x M), not O(edges x M^2)."""
    num_rois, num_polygons = vertices.shape[:2]
    size = mask_size
    x0, y0, x1, y1 = vertices.unbind(-1)  # (R, P, V) each
    cells = torch.arange(size, device=vertices.device, dtype=torch.float64)
    dx, dy = (x1 - x0).abs(), (y1 - y0).abs()
    x_major = dx >= dy
    # Each edge is traced from its lower end along its major axis (pycocotools' flip).
    swap = torch.where(x_major, x0 > x1, y0 > y1)
    xa, ya = torch.where(swap, x1, x0), torch.where(swap, y1, y0)
    xb, yb = torch.where(swap, x0, x1), torch.where(swap, y0, y1)
    e = lambda t: t[..., None]  # noqa: E731 (R, P, V, 1): broadcasts against the M columns or rows
    first_column = lambda u: ((u - 2) / _UPSAMPLE).ceil().clamp(min=0)  # noqa: E731 first x with u <= 5x + 2
    last_column = lambda u: ((u - 3) / _UPSAMPLE).floor().clamp(max=size - 1)  # noqa: E731 last x with 5x + 3 <= u
    grid = cells * _UPSAMPLE + 2

    # x-major edges: a traced point per grid column; a column's crossing is at the lower v of its two points,
    # and toggles the rows y >= ceil((v - 2) / 5). Counted per (column, first row), summed over rows below.
    slope = (yb - ya) / dx.clamp(min=1)
    before = torch.trunc(e(ya) + e(slope) * (grid - e(xa)) + 0.5)
    after = torch.trunc(e(ya) + e(slope) * (grid + 1 - e(xa)) + 0.5)
    crosses = e(x_major) & (cells >= e(first_column(xa))) & (cells <= e(last_column(xb)))  # (R, P, V, columns)
    first_row = ((torch.minimum(before, after) - 2) / _UPSAMPLE).ceil().clamp(0, size)
    column_rows = _histogram(first_row, crosses, size, lead=(num_rois, num_polygons, size))
    toggles = column_rows.cumsum(dim=-1)[..., :size].transpose(2, 3)  # (R, P, rows, columns)

    # y-major edges: a traced point per grid row; u(v) is monotonic, so the crossing of column x lies at or
    # above row 5y + 2 exactly when u at v = 5y + 3 (clamped to the edge) has passed it. For each row, the
    # columns passed form a range: +1 at its start, -1 after its end, summed along the columns.
    run = (xb - xa) / dy.clamp(min=1)
    u_start, u_end = torch.trunc(xa + 0.5), torch.trunc(xa + run * (yb - ya) + 0.5)
    lowest = e(first_column(torch.minimum(u_start, u_end)))
    highest = e(last_column(torch.maximum(u_start, u_end)))
    v = torch.minimum(torch.maximum(grid + 1, e(ya)), e(yb))  # (R, P, V, rows)
    u = torch.trunc(e(xa) + e(run) * (v - e(ya)) + 0.5)
    rising = e(run) > 0
    start = torch.where(rising, lowest, torch.maximum(lowest, first_column(u)))
    stop = torch.where(rising, torch.minimum(highest, last_column(u)), highest) + 1
    active = ~e(x_major) & (start < stop)
    row_columns = _histogram(start, active, size, lead=(num_rois, num_polygons, size))
    row_columns -= _histogram(stop, active, size, lead=(num_rois, num_polygons, size))
    toggles += row_columns.cumsum(dim=-1)[..., :size]
    return (toggles % 2 == 1).any(dim=1)


def _histogram(bins, weights, size, lead):
    """(*lead, size + 1) counts: for each (roi, polygon, m), how many edges v have bins[r, p, v, m] == b
    (bins in 0..size, counted where weights is true)."""
    num_rois, num_polygons, m = lead
    r = torch.arange(num_rois, device=bins.device)[:, None, None, None]
    p = torch.arange(num_polygons, device=bins.device)[None, :, None, None]
    k = torch.arange(m, device=bins.device)[None, None, None, :]
    flat = ((r * num_polygons + p) * m + k) * (size + 1) + bins.clamp(0, size).long()
    counts = torch.zeros(num_rois * num_polygons * m * (size + 1), dtype=torch.int32, device=bins.device)
    counts.index_add_(0, flat.flatten(), weights.flatten().to(torch.int32))
    return counts.view(num_rois, num_polygons, m, size + 1)
