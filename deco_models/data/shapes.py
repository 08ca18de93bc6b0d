"""The shapes world: a deterministic synthetic scene generator with exact ground truth, and the LLaVA-format tasks
built on it (captions, attribute VQA, POPE-style yes/no probes, grounding, counting).

Scenes are 96×96 RGB images (8-px patches → a 12×12 patch grid) with 1–4 non-overlapping objects on a light, noisy
background. Every object is a shape (circle, square, triangle) × color (red, green, blue, yellow) × size (small,
large) at some position; the ground truth per object is its tight pixel box, normalized box, attributes, mask and
left-to-right rank, plus pairwise relations. Objects are drawn without anti-aliasing so boxes and masks are exact.

Example:
    >>> from deco_models.data.shapes import generate_scene, caption
    >>> scene = generate_scene(0)
    >>> scene.image.shape
    (96, 96, 3)
    >>> caption(scene) == caption(generate_scene(0))
    True
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SIZE = 96
PATCH_SIZE = 8
GRID = IMAGE_SIZE // PATCH_SIZE
SHAPES = ("circle", "square", "triangle")
COLOR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 200, 40),
}
COLORS = tuple(COLOR_RGB)
# Side length ranges in pixels (inclusive); 16–32 px matches DESIGN.md's sizes.
SIZE_RANGES = {"small": (16, 22), "large": (26, 32)}
SIZES = tuple(SIZE_RANGES)
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
# Labels of the per-patch attribute objective used to pretrain the vision encoder: colors then shapes.
PATCH_LABELS = COLORS + SHAPES
TASKS = ("caption", "vqa", "pope", "grounding", "counting")
POPE_KINDS = ("random", "popular", "adversarial")
BACKGROUND_LEVEL = 232
BACKGROUND_NOISE = 6.0
# Minimum gap between boxes (px) and between object centers along x, so "left of" is never ambiguous.
MIN_GAP = 2
MIN_CENTER_DX = 6


@dataclass
class ShapeObject:
    """One drawn object. ``box`` is ``[x0, y0, x1, y1]`` in pixels, end-exclusive (the tight bounding box of its
    pixels); ``box_norm`` is the same divided by the image size."""

    shape: str
    color: str
    size: str
    box: list[int]
    box_norm: list[float]
    rank: int = 0  # 0 = leftmost

    @property
    def name(self) -> str:
        return f"{self.size} {self.color} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2, (y0 + y1) / 2)


@dataclass
class Scene:
    """A generated scene: the image (``uint8 [H, W, 3]``), the object-index mask (``int [H, W]``, 0 = background,
    ``k + 1`` = ``objects[k]``), the objects sorted left to right, and pairwise relations."""

    seed: int | tuple
    image: np.ndarray
    mask: np.ndarray
    objects: list[ShapeObject]
    relations: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "seed": list(self.seed) if isinstance(self.seed, tuple) else self.seed,
            "objects": [asdict(o) for o in self.objects],
            "relations": self.relations,
        }


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, tuple | list):
        return np.random.default_rng([int(s) for s in seed])
    return np.random.default_rng(int(seed))


def _draw(canvas: np.ndarray, mask: np.ndarray, shape: str, x0: int, y0: int, side: int, color, index: int) -> None:
    import cv2

    # Draw on a single-channel stencil first so the mask and the image agree pixel for pixel (no anti-aliasing).
    stencil = np.zeros(mask.shape, np.uint8)
    x1, y1 = x0 + side - 1, y0 + side - 1  # inclusive corners
    if shape == "square":
        stencil[y0 : y1 + 1, x0 : x1 + 1] = 1
    elif shape == "circle":
        # cv2.circle leaves one-pixel nubs at the poles; a disc test gives a clean, symmetric circle.
        c, r = (side - 1) / 2, side / 2
        yy, xx = np.mgrid[0:side, 0:side]
        stencil[y0 : y0 + side, x0 : x0 + side] = ((xx - c) ** 2 + (yy - c) ** 2 <= r * r - r / 2).astype(np.uint8)
    elif shape == "triangle":
        pts = np.array([[x0, y1], [x1, y1], [(x0 + x1) // 2, y0]], np.int32)
        cv2.fillPoly(stencil, [pts], 1, lineType=cv2.LINE_8)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    on = stencil.astype(bool)
    canvas[on] = color
    mask[on] = index


def generate_scene(seed, n_objects: int | None = None, max_objects: int = 3, min_objects: int = 1) -> Scene:
    """Generate one scene deterministically from ``seed`` (an int or a tuple of ints, e.g. ``(dataset_seed, i)``).

    ``n_objects`` fixes the object count; otherwise it is drawn uniformly from ``[min_objects, max_objects]``
    (at most 4).

    Example:
        >>> s = generate_scene((7, 3), n_objects=2)
        >>> len(s.objects), [o.rank for o in s.objects]
        (2, [0, 1])
    """
    if not 1 <= min_objects <= max_objects <= 4:
        raise ValueError(f"expected 1 <= min_objects <= max_objects <= 4, got {min_objects}, {max_objects}")
    if n_objects is not None and not 1 <= n_objects <= 4:
        raise ValueError(f"n_objects must be in 1..4, got {n_objects}")
    rng = _rng(seed)
    n = int(n_objects) if n_objects is not None else int(rng.integers(min_objects, max_objects + 1))
    # Rejection sampling of the whole layout: cheap at 96 px with ≤ 4 objects of ≤ 32 px.
    for _attempt in range(200):
        placed: list[tuple[int, int, int, str, str, str]] = []
        ok = True
        for _ in range(n):
            size = SIZES[rng.integers(len(SIZES))]
            lo, hi = SIZE_RANGES[size]
            side = int(rng.integers(lo, hi + 1))
            for _try in range(50):
                x0 = int(rng.integers(1, IMAGE_SIZE - side))
                y0 = int(rng.integers(1, IMAGE_SIZE - side))
                if all(_apart((x0, y0, side), (px, py, ps)) for px, py, ps, *_ in placed):
                    break
            else:
                ok = False
                break
            placed.append((x0, y0, side, SHAPES[rng.integers(len(SHAPES))], COLORS[rng.integers(len(COLORS))], size))
        if ok:
            break
    else:  # pragma: no cover - 200 failed layouts of ≤ 4 small objects does not happen in practice
        raise RuntimeError(f"could not place {n} objects for seed {seed!r}")

    tint = rng.integers(-8, 9, size=3)
    background = BACKGROUND_LEVEL + tint + rng.normal(0, BACKGROUND_NOISE, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    canvas = np.clip(background, 205, 255).astype(np.uint8)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.int32)
    placed.sort(key=lambda p: p[0] + p[2] / 2)  # left to right by center x
    objects = []
    for k, (x0, y0, side, shape, color, size) in enumerate(placed):
        _draw(canvas, mask, shape, x0, y0, side, COLOR_RGB[color], k + 1)
        ys, xs = np.nonzero(mask == k + 1)
        box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        box_norm = [round(v / IMAGE_SIZE, 4) for v in box]
        objects.append(ShapeObject(shape, color, size, box, box_norm, rank=k))
    # Mild per-object shading noise so colors are not single RGB values (kept small: colors stay unambiguous).
    shade = rng.normal(0, 4.0, size=canvas.shape)
    on = mask > 0
    canvas[on] = np.clip(canvas[on] + shade[on], 0, 255).astype(np.uint8)
    return Scene(seed=tuple(seed) if isinstance(seed, tuple | list) else int(seed), image=canvas, mask=mask,
                 objects=objects, relations=_relations(objects))


def _apart(a, b) -> bool:
    ax, ay, aside = a
    bx, by, bside = b
    separated = (
        ax + aside + MIN_GAP <= bx
        or bx + bside + MIN_GAP <= ax
        or ay + aside + MIN_GAP <= by
        or by + bside + MIN_GAP <= ay
    )
    return separated and abs((ax + aside / 2) - (bx + bside / 2)) >= MIN_CENTER_DX


def _relations(objects: list[ShapeObject]) -> list[dict]:
    rels = []
    for i, a in enumerate(objects):
        for j, b in enumerate(objects):
            if i == j:
                continue
            if a.center[0] < b.center[0]:
                rels.append({"subject": i, "relation": "left of", "object": j})
            if a.box[3] <= b.box[1]:
                rels.append({"subject": i, "relation": "above", "object": j})
    return rels


def layout_key(scene: Scene) -> tuple:
    """What makes two scenes the same content: the objects (shape, color, size, exact pixel box), left to right.
    Two scenes with equal keys differ only in background and shading noise, so a key shared by a training scene and
    an evaluation scene is a leak even when the pixels differ.

    Example:
        >>> layout_key(generate_scene((7, 3), n_objects=1)) == layout_key(generate_scene((7, 3), n_objects=1))
        True
    """
    return tuple((o.shape, o.color, o.size, *o.box) for o in scene.objects)


def patch_labels(scene: Scene, min_fraction: float = 0.2) -> np.ndarray:
    """Per-patch multi-label targets ``float32 [GRID*GRID, len(PATCH_LABELS)]`` (row-major patches): a color/shape
    label is on when an object with it covers at least ``min_fraction`` of the patch.

    Example:
        >>> patch_labels(generate_scene(0)).shape
        (144, 7)
    """
    labels = np.zeros((GRID * GRID, len(PATCH_LABELS)), np.float32)
    cells = scene.mask.reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE).transpose(0, 2, 1, 3).reshape(GRID * GRID, -1)
    for k, obj in enumerate(scene.objects):
        covered = (cells == k + 1).mean(axis=1) >= min_fraction
        labels[covered, PATCH_LABELS.index(obj.color)] = 1.0
        labels[covered, PATCH_LABELS.index(obj.shape)] = 1.0
    return labels


# ----------------------------------------------------------------------------------------------------------- tasks


def caption(scene: Scene) -> str:
    """Objects left to right: ``"a small red circle left of a large blue square"``."""
    return " left of ".join(f"a {o.name}" for o in scene.objects)


def box_text(box_norm) -> str:
    """Normalized box as LLaVA grounding text, two decimals: ``[0.10, 0.20, 0.45, 0.50]``."""
    return "[" + ", ".join(f"{v:.2f}" for v in box_norm) + "]"


def _turn(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]


def _unique(scene: Scene, **attrs) -> ShapeObject | None:
    hits = [o for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items())]
    return hits[0] if len(hits) == 1 else None


def pope_negative(scene: Scene, kind: str, rng: np.random.Generator, popularity: list[tuple[str, str]] | None = None):
    """An absent ``(color, shape)`` chosen like POPE: ``random`` (uniform over absent pairs), ``popular`` (the
    absent pair most frequent in the dataset, ``popularity`` = pairs most frequent first), ``adversarial`` (an absent
    pair sharing the color or the shape of a present object, i.e. a likely co-occurring confusion)."""
    present = {(o.color, o.shape) for o in scene.objects}
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    if kind == "random":
        return absent[rng.integers(len(absent))]
    if kind == "popular":
        order = popularity or [(c, s) for c in COLORS for s in SHAPES]
        return next(p for p in order if p not in present)
    if kind == "adversarial":
        near = [p for p in absent if any(p[0] == c or p[1] == s for c, s in present)]
        return (near or absent)[rng.integers(len(near or absent))]
    raise ValueError(f"unknown POPE kind {kind!r}; expected one of {POPE_KINDS}")


def scene_tasks(scene: Scene, scene_id: str, image: str, tasks=TASKS, rng: np.random.Generator | None = None,
                popularity: list[tuple[str, str]] | None = None) -> list[dict]:
    """LLaVA conversation samples (``{"id", "image", "conversations", "task", ...}``) for one scene.

    Example:
        >>> s = generate_scene(1)
        >>> [t["task"] for t in scene_tasks(s, "0", "0.png", tasks=("caption",))]
        ['caption']
    """
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; expected a subset of {TASKS}")
    rng = rng if rng is not None else _rng(scene.seed if isinstance(scene.seed, int) else tuple(scene.seed) + (1,))
    out: list[dict] = []

    def add(task, q, a, **extra):
        out.append({"id": f"{scene_id}-{task}-{len(out)}", "image": image, "conversations": _turn(q, a),
                    "task": task, **extra})

    objs = scene.objects
    if "caption" in tasks:
        add("caption", "Describe the image.", caption(scene))
    if "vqa" in tasks:
        o = objs[rng.integers(len(objs))]
        if _unique(scene, shape=o.shape):
            add("vqa", f"What color is the {o.shape}?", o.color, object=o.rank)
        if _unique(scene, color=o.color):
            add("vqa", f"What shape is the {o.color} object?", o.shape, object=o.rank)
        if _unique(scene, color=o.color, shape=o.shape):
            add("vqa", f"What size is the {o.color} {o.shape}?", o.size, object=o.rank)
    if "pope" in tasks:
        for kind in POPE_KINDS:
            o = objs[rng.integers(len(objs))]
            add("pope", f"Is there a {o.color} {o.shape} in the image?", "yes", pope=kind, object=o.rank)
            c, s = pope_negative(scene, kind, rng, popularity)
            add("pope", f"Is there a {c} {s} in the image?", "no", pope=kind)
    if "grounding" in tasks:
        uniques = [o for o in objs if _unique(scene, color=o.color, shape=o.shape)]
        if uniques:
            o = uniques[rng.integers(len(uniques))]
            add("grounding", f"Where is the {o.color} {o.shape}?", box_text(o.box_norm), object=o.rank)
    if "counting" in tasks:
        add("counting", "How many objects are there?", NUMBER_WORDS[len(objs)])
        c = COLORS[rng.integers(len(COLORS))]
        add("counting", f"How many {c} objects are there?", NUMBER_WORDS[sum(o.color == c for o in objs)])
    return out


def world_texts() -> list[str]:
    """Every word the world's tasks can produce (questions and answers), for building the vocabulary."""
    texts = ["Describe the image.", "How many objects are there?", "yes", "no", " ".join(NUMBER_WORDS),
             "left of above below"]
    for c in COLORS:
        texts.append(f"How many {c} objects are there? What shape is the {c} object?")
        for s in SHAPES:
            texts.append(f"What color is the {s}? What size is the {c} {s}? Where is the {c} {s}? "
                         f"Is there a {c} {s} in the image?")
            for z in SIZES:
                texts.append(f"a {z} {c} {s}")
    texts.append(box_text([0.0, 0.5, 0.99, 1.0]) + " " + " ".join(f"{v:02d}" for v in range(100)))
    return texts


# --------------------------------------------------------------------------------------------------------- dataset


def write_dataset(out_dir: str | os.PathLike, n_scenes: int, seed: int = 0, tasks=TASKS, max_objects: int = 3,
                  progress: bool = True) -> Path:
    """Write ``n_scenes`` scenes to ``out_dir``: ``images/NNNNNN.png``, ``scenes.json`` (ground truth) and
    ``conversations.json`` (LLaVA format, image paths relative to ``out_dir``). Returns ``out_dir``.

    Scene ``i`` is ``generate_scene((seed, i))``, so any scene can be regenerated without reading the files.

    Example:
        >>> import tempfile
        >>> d = write_dataset(tempfile.mkdtemp(), 4, seed=1, progress=False)
        >>> sorted(p.name for p in d.iterdir())
        ['conversations.json', 'images', 'scenes.json']
    """
    import cv2
    from tqdm.auto import tqdm

    from deco_models.io import atomic_write

    if n_scenes < 1:
        raise ValueError(f"n_scenes must be >= 1, got {n_scenes}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scenes = [generate_scene((seed, i), max_objects=max_objects)
              for i in tqdm(range(n_scenes), desc="scenes", disable=not progress)]
    # POPE "popular" negatives: the dataset's most frequent (color, shape) pairs, as POPE ranks by frequency.
    counts = Counter((o.color, o.shape) for s in scenes for o in s.objects)
    popularity = [p for p, _ in counts.most_common()] + [(c, s) for c in COLORS for s in SHAPES if (c, s) not in counts]
    records, conversations = [], []
    for i, scene in enumerate(tqdm(scenes, desc="writing", disable=not progress)):
        name = f"images/{i:06d}.png"
        cv2.imwrite(str(out / name), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
        records.append({"id": f"{i:06d}", "image": name, **scene.to_json()})
        conversations.extend(scene_tasks(scene, f"{i:06d}", name, tasks=tasks, rng=_rng((seed, i, 1)),
                                         popularity=popularity))
    atomic_write(out / "scenes.json", lambda p: Path(p).write_text(json.dumps(records)))
    atomic_write(out / "conversations.json", lambda p: Path(p).write_text(json.dumps(conversations)))
    return out
