"""The shapes world as an rgae dataset: ``--data shapes:SEED:N`` (installed as the ``shapes`` reader of the
``rgae.datasets`` entry-point group, so rgae finds it without importing deco_models).

Record ``i`` is scene ``generate_scene((SEED, i), max_objects=3)`` — the scenes ``examples/shapes_table.py`` scores
with ``SEED = HELDOUT_SEED`` — with its caption as the explained text, the prompt ``"Describe the image."``, one box
per object (its exact pixel box, mask label ``k + 1``) and the object-index mask. A box's words are the object's
color and shape **when no other object in the scene shares them**, so each scored word has one ground-truth object
(the words ``rgae.commands.demo.unique_word_boxes`` scores).

Example:
    >>> records = read_shapes("7:2")
    >>> [r.id for r in records], records[0].mask.shape
    (['000000', '000001'], (96, 96))
"""

from __future__ import annotations

from deco_models.data.shapes import caption, generate_scene
from rgae.datasets.records import Box, Record

PROMPT = "Describe the image."
MAX_OBJECTS = 3


def scene_record(scene, record_id: str) -> Record:
    """The :class:`~rgae.datasets.records.Record` of one scene."""
    boxes = []
    for k, obj in enumerate(scene.objects):
        words = [getattr(obj, attr) for attr in ("color", "shape")
                 if sum(getattr(o, attr) == getattr(obj, attr) for o in scene.objects) == 1]
        boxes.append(Box(words=tuple(words), box=tuple(float(v) for v in obj.box), label=k + 1))
    seed = list(scene.seed) if isinstance(scene.seed, tuple) else scene.seed
    return Record(id=record_id, image=scene.image, text=caption(scene), prompt=PROMPT, boxes=tuple(boxes),
                  mask=scene.mask, extra={"scene_seed": seed})


def read_shapes(args: str, image_folder: str | None = None) -> list[Record]:
    """Records of ``shapes:SEED:N`` (``args`` = ``"SEED:N"``); ``image_folder`` is not used (images are generated)."""
    parts = args.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        seed, n = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"shapes data must be shapes:SEED:N (two integers), got shapes:{args}") from None
    if n < 1:
        raise ValueError(f"shapes:SEED:N needs N >= 1, got {n}")
    return [scene_record(generate_scene((seed, i), max_objects=MAX_OBJECTS), f"{i:06d}") for i in range(n)]
