"""A synthetic Cityscapes: street-like scenes in exactly the official layout and file formats.

Each image is a road scene in perspective (sky, buildings, vegetation, sidewalk, road) with instances of all
10 Cityscapes instance classes, drawn far to near so nearer objects occlude farther ones, truncated at the
image borders, with crowd regions ("cargroup", ...), tiny far-away instances, poles and signs in front of them
and the ego vehicle's hood; some images have no instances. Every class has its own silhouette and colour, so
a small Mask R-CNN learns it on a CPU in minutes: it is the data of the demo and of the learning tests.

The label, instance and colour images are rendered from the written JSON by cityscapesscripts' own
createLabelImage / createInstanceImage, so they are what its json2labelImg / json2instanceImg would make.
"""
import json
import os
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from cityscapesscripts.preparation.json2labelImg import createLabelImage
from PIL import Image, ImageDraw

CITIES = {
    "train": ("aachen", "bochum", "bremen", "cologne"),
    "val": ("frankfurt", "lindau", "munster"),
    "test": ("berlin", "bielefeld", "bonn"),
}
_FRAME = 19  # the annotated frame of every Cityscapes sequence

# Silhouettes in a unit box: x from -0.5 (back) to 0.5 (front), y from 0 (ground) to 1 (top).
_SHAPES = {
    "person": [(-0.3, 0), (-0.1, 0), (0, 0.42), (0.1, 0), (0.3, 0), (0.22, 0.48), (0.5, 0.52), (0.42, 0.76),
               (0.16, 0.8), (0.2, 0.92), (0.08, 1), (-0.08, 1), (-0.2, 0.92), (-0.16, 0.8), (-0.42, 0.76),
               (-0.5, 0.52), (-0.22, 0.48)],
    "rider": [(-0.15, 0.35), (0.1, 0.35), (0.15, 0.6), (0.5, 0.62), (0.45, 0.72), (0.15, 0.78), (0.18, 0.9),
              (0.05, 1), (-0.1, 0.95), (-0.08, 0.8), (-0.3, 0.72)],
    "car": [(-0.5, 0.05), (-0.35, 0), (-0.2, 0.05), (0.2, 0.05), (0.35, 0), (0.5, 0.05), (0.5, 0.5),
            (0.28, 0.56), (0.14, 1), (-0.26, 1), (-0.4, 0.56), (-0.5, 0.5)],
    "truck": [(-0.5, 0), (0.5, 0), (0.5, 0.55), (0.44, 0.7), (0.28, 0.72), (0.26, 1), (-0.5, 1)],
    "bus": [(-0.5, 0), (0.5, 0), (0.5, 0.88), (0.45, 1), (-0.46, 1), (-0.5, 0.9)],
    "train": [(-0.5, 0), (0.5, 0), (0.5, 0.55), (0.38, 1), (-0.5, 1)],
    "motorcycle": [(-0.5, 0), (-0.22, 0), (-0.1, 0.3), (0.1, 0.3), (0.22, 0), (0.5, 0), (0.46, 0.45),
                   (0.22, 0.7), (0.34, 1), (0.12, 0.95), (-0.28, 0.62), (-0.5, 0.5)],
    "bicycle": [(-0.5, 0), (-0.3, 0), (0, 0.5), (0.3, 0), (0.5, 0), (0.36, 0.58), (0.42, 1), (0.3, 1),
                (0.16, 0.68), (-0.2, 0.68), (-0.34, 0.86), (-0.46, 0.86)],
    "caravan": [(-0.5, 0.08), (0.5, 0.08), (0.5, 0.75), (0.36, 1), (-0.44, 1), (-0.5, 0.92)],
    "trailer": [(-0.5, 0.1), (0.24, 0.1), (0.24, 0.2), (0.5, 0.22), (0.5, 0.28), (0.24, 0.3), (0.24, 0.75),
                (-0.5, 0.75)],
}
_GROUP_SHAPE = [(-0.5, 0), (0.5, 0), (0.5, 0.7), (0.35, 1), (0.2, 0.72), (0.05, 0.95), (-0.12, 0.7),
                (-0.28, 1), (-0.42, 0.75), (-0.5, 0.8)]
# (height in metres, length / height, relative frequency, appearance colour): sizes as on a street,
# colours chosen to tell the classes apart at a glance.
_CLASSES = {
    "person": (1.75, 0.45, 10, (205, 35, 55)),
    "rider": (1.0, 1.1, 3, (245, 150, 25)),  # the upper body; it sits on a bicycle or motorcycle
    "car": (1.5, 2.4, 14, (35, 70, 205)),
    "truck": (3.2, 2.3, 2, (45, 155, 70)),
    "bus": (3.2, 3.6, 2, (235, 210, 45)),
    "train": (3.8, 6.0, 1, (45, 200, 215)),
    "motorcycle": (1.2, 1.5, 2, (175, 45, 205)),
    "bicycle": (1.05, 1.6, 3, (250, 130, 185)),
    "caravan": (2.6, 2.4, 1, (225, 215, 185)),
    "trailer": (1.6, 2.2, 1, (125, 80, 40)),
}
_STUFF_COLOURS = {
    "sky": (135, 180, 230), "building": (110, 100, 95), "vegetation": (70, 120, 40), "sidewalk": (170, 160, 150),
    "road": (85, 85, 90), "terrain": (150, 170, 90), "pole": (60, 60, 60), "traffic sign": (240, 240, 240),
    "ego vehicle": (25, 25, 25), "license plate": (250, 250, 250),
}
_THING_NAMES = list(_CLASSES)
_THING_WEIGHTS = np.array([_CLASSES[n][2] for n in _THING_NAMES], dtype=float) / sum(c[2] for c in _CLASSES.values())


def image_ids(split, count):
    """(city, image_id) of the count images of a split: cities in turn, sequences numbered per city."""
    cities = CITIES[split]
    return [
        (cities[i % len(cities)], f"{cities[i % len(cities)]}_{i // len(cities):06d}_{_FRAME:06d}") for i in range(count)
    ]


class _Scene:
    """Objects (label, polygon, colour) of one image in drawing order."""

    def __init__(self, rng, width, height):
        self.rng, self.width, self.height = rng, width, height
        self.objects = []

    def add(self, label, points, colour):
        points = np.round(np.asarray(points, dtype=float))
        points[:, 0] = points[:, 0].clip(0, self.width - 1)
        points[:, 1] = points[:, 1].clip(0, self.height - 1)
        if np.ptp(points[:, 0]) < 1 or np.ptp(points[:, 1]) < 1:
            return  # entirely outside the image
        jitter = self.rng.integers(-18, 19, 3)
        self.objects.append((label, points.astype(int).tolist(), tuple(int(v) for v in np.clip(np.add(colour, jitter), 0, 255))))

    def shape(self, label, unit_points, x, bottom, height, length, mirror=False):
        unit = np.asarray(unit_points, dtype=float)
        xs = unit[:, 0] * (-1 if mirror else 1) * length + x
        self.add(label, np.stack([xs, bottom - unit[:, 1] * height], 1), _CLASSES.get(label.replace("group", ""), (0, 0, 0))[3])


def _background(scene, horizon):
    w, h, rng = scene.width, scene.height, scene.rng
    scene.add("sky", [(0, 0), (w, 0), (w, horizon), (0, horizon)], _STUFF_COLOURS["sky"])
    x = -rng.uniform(0, 0.1) * w
    while x < w:  # a row of buildings with trees between them
        width = rng.uniform(0.08, 0.25) * w
        if rng.random() < 0.25:
            r = width / 2
            angles = np.linspace(0, 2 * np.pi, 9)[:-1]
            crown = np.stack([x + r + r * np.cos(angles), horizon - r * 0.8 + r * 0.8 * np.sin(angles)], 1)
            scene.add("vegetation", crown, _STUFF_COLOURS["vegetation"])
        else:
            top = horizon - rng.uniform(0.12, 0.4) * h
            scene.add("building", [(x, horizon + 2), (x + width, horizon + 2), (x + width, top), (x, top)], _STUFF_COLOURS["building"])
        x += width
    scene.add("sidewalk", [(0, horizon), (w, horizon), (w, h), (0, h)], _STUFF_COLOURS["sidewalk"])
    vanish = rng.uniform(0.35, 0.65) * w
    spread = rng.uniform(0.55, 0.8) * w
    scene.add("road", [(vanish - 0.02 * w, horizon), (vanish + 0.02 * w, horizon), (vanish + spread, h + 0.2 * h), (vanish - spread, h + 0.2 * h)], _STUFF_COLOURS["road"])
    if rng.random() < 0.5:
        side = rng.choice([0, w])
        scene.add("terrain", [(side, horizon + 0.1 * h), (abs(side - 0.12 * w), horizon + 0.1 * h), (abs(side - 0.05 * w), h), (side, h)], _STUFF_COLOURS["terrain"])


def _things(scene, horizon, pixels_per_metre, mean_instances):
    """Instances and crowds, far to near: each with its size at its distance (smaller near the horizon)."""
    rng, w, h = scene.rng, scene.width, scene.height
    if rng.random() < 0.08:
        return  # an image without instances
    count = rng.poisson(mean_instances)
    placed = []
    for _ in range(count):
        depth = rng.uniform(0.03, 1.08) ** 1.3  # 0 at the horizon, 1 at the bottom of the image
        placed.append((depth, rng.choice(_THING_NAMES, p=_THING_WEIGHTS), rng.uniform(-0.1, 1.1) * w))
    if count and rng.random() < 0.5:  # a tiny instance far away (under 100 pixels)
        placed.append((rng.uniform(0.02, 0.05), "person", rng.uniform(0.1, 0.9) * w))
    for _ in range(rng.binomial(2, 0.2)):
        placed.append((rng.uniform(0.1, 0.4), rng.choice(["cargroup", "persongroup", "bicyclegroup"]), rng.uniform(0, 1) * w))
    for depth, label, x in sorted(placed, key=lambda item: item[0]):
        bottom = horizon + depth * (h - horizon)
        scale = depth * pixels_per_metre
        mirror = bool(rng.random() < 0.5)
        if label.endswith("group"):
            metres, aspect = _CLASSES[label[: -len("group")]][:2]
            scene.shape(label, _GROUP_SHAPE, x, bottom, metres * scale, metres * scale * aspect * rng.uniform(2, 4))
            continue
        metres, aspect = _CLASSES[label][:2]
        metres *= rng.uniform(0.9, 1.1)
        if metres > 2.5:  # keep large vehicles from filling the whole image
            scale = min(depth, 0.7) * pixels_per_metre
        if label == "car" and rng.random() < 0.5:
            aspect = 1.2  # seen from behind
        if label == "rider":
            vehicle = "bicycle" if rng.random() < 0.7 else "motorcycle"
            wheel_height = _CLASSES[vehicle][0] * scale
            scene.shape(vehicle, _SHAPES[vehicle], x, bottom, wheel_height, wheel_height * _CLASSES[vehicle][1], mirror)
            bottom -= wheel_height * 0.45
        height = metres * scale
        scene.shape(label, _SHAPES[label], x, bottom, height, height * aspect, mirror)
        if label == "car" and aspect < 2 and height > 12:
            plate = [(x - 0.12 * height, bottom - 0.22 * height), (x + 0.12 * height, bottom - 0.22 * height),
                     (x + 0.12 * height, bottom - 0.32 * height), (x - 0.12 * height, bottom - 0.32 * height)]
            scene.add("license plate", plate, _STUFF_COLOURS["license plate"])  # id -1: not in the label images
        if rng.random() < 0.08:  # a pole with a sign in front of something
            pole_x = x + rng.uniform(-0.3, 0.3) * height
            pole_w = max(2.0, 0.08 * scale)
            pole_top = bottom - 3.5 * scale
            scene.add("pole", [(pole_x, bottom + 2), (pole_x + pole_w, bottom + 2), (pole_x + pole_w, pole_top), (pole_x, pole_top)], _STUFF_COLOURS["pole"])
            r = 0.35 * scale
            angles = np.linspace(0, 2 * np.pi, 9)[:-1]
            scene.add("traffic sign", np.stack([pole_x + r * np.cos(angles), pole_top + r * np.sin(angles)], 1), _STUFF_COLOURS["traffic sign"])


def _ego_vehicle(scene):
    w, h, rng = scene.width, scene.height, scene.rng
    top = h * rng.uniform(0.9, 0.95)
    hood = [(0, h), (0, top + 0.03 * h), (0.25 * w, top), (0.75 * w, top), (w, top + 0.03 * h), (w, h)]
    scene.add("ego vehicle", hood, _STUFF_COLOURS["ego vehicle"])


def make_scene(rng, width, height, mean_instances=8):
    """The polygons JSON dict and the object colours of one random street scene."""
    scene = _Scene(rng, width, height)
    horizon = height * rng.uniform(0.38, 0.5)
    _background(scene, horizon)
    _things(scene, horizon, pixels_per_metre=0.2 * height, mean_instances=mean_instances)
    if rng.random() < 0.7:
        _ego_vehicle(scene)
    annotation = {
        "imgHeight": height,
        "imgWidth": width,
        "objects": [{"label": label, "polygon": points} for label, points, _ in scene.objects],
    }
    return annotation, [colour for _, _, colour in scene.objects]


def render_image(annotation, colours, rng):
    """The RGB image: each polygon filled with its colour (same rasterizer as the labels), plus shading and noise."""
    image = Image.new("RGB", (annotation["imgWidth"], annotation["imgHeight"]))
    draw = ImageDraw.Draw(image)
    for obj, colour in zip(annotation["objects"], colours):
        draw.polygon([tuple(p) for p in obj["polygon"]], fill=colour)
    pixels = np.asarray(image, dtype=np.int16)
    shade = np.linspace(-12, 12, pixels.shape[0], dtype=np.int16)[:, None, None]
    noise = rng.integers(-10, 11, pixels.shape[:2], dtype=np.int16)[:, :, None]
    return np.clip(pixels + shade + noise, 0, 255).astype(np.uint8)


def write_image(out, split, city, image_id, rng, width, height, mean_instances=8):
    """Write one image and its four gtFine files."""
    annotation, colours = make_scene(rng, width, height, mean_instances)
    image_dir = os.path.join(out, "leftImg8bit", split, city)
    gt_dir = os.path.join(out, "gtFine", split, city)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(gt_dir, exist_ok=True)
    prefix = os.path.join(gt_dir, image_id + "_gtFine_")
    text = json.dumps(annotation)
    with open(prefix + "polygons.json", "w") as f:
        f.write(text)
    parsed = Annotation()
    parsed.fromJsonText(text)
    cv2.imwrite(prefix + "labelIds.png", np.asarray(createLabelImage(parsed, "ids")))
    cv2.imwrite(prefix + "color.png", cv2.cvtColor(np.asarray(createLabelImage(parsed, "color")), cv2.COLOR_RGBA2BGRA))
    # json2instanceImg cannot save Pillow's mode "I" as PNG any more: save its pixels as 16-bit PNG instead.
    cv2.imwrite(prefix + "instanceIds.png", np.asarray(createInstanceImage(parsed, "ids")).astype(np.uint16))
    rgb = render_image(annotation, colours, rng)
    cv2.imwrite(os.path.join(image_dir, image_id + "_leftImg8bit.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _write_image_star(job):
    out, split, city, image_id, seed, index, width, height, mean_instances = job
    rng = np.random.default_rng([seed, list(CITIES).index(split), index])
    write_image(out, split, city, image_id, rng, width, height, mean_instances)


def make_synthetic_cityscapes(out, splits=None, width=512, height=256, seed=0, mean_instances=8, workers=1):
    """Write a synthetic Cityscapes under `out` (leftImg8bit/ and gtFine/) and return `out`.

    splits: {"train": N, "val": M, "test": K} image counts. Each image depends only on (seed, split, index),
    so a larger set starts with the images of a smaller one. mean_instances: average instances per image
    (Cityscapes has about 20 at 2048x1024).
    """
    splits = {"train": 6, "val": 4} if splits is None else splits
    unknown = set(splits) - set(CITIES)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; choose from {list(CITIES)}")
    jobs = [
        (str(out), split, city, image_id, seed, index, width, height, mean_instances)
        for split, count in splits.items()
        for index, (city, image_id) in enumerate(image_ids(split, count))
    ]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_image_star, jobs, chunksize=4))
    else:
        for job in jobs:
            _write_image_star(job)
    return str(out)
