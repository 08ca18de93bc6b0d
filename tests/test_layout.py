"""rgae.layout: views, patch boxes and the rendering onto the original image, against slow per-pixel references;
rgae.adapters.geometry against what the image processors really do to pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rgae import Explanation
from rgae.adapters.geometry import content_box_view, resize_crop_box
from rgae.layout import ImageLayout, View, box_weights, linear_weights


def slow_render(layout: ImageLayout, values: torch.Tensor) -> torch.Tensor:
    """Per pixel, per patch: the overlap area of the pixel with the patch box over the box area, times the value."""
    h, w = layout.image_size
    out = torch.zeros(h, w, dtype=torch.float64)
    boxes = layout.patch_boxes()
    for p, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        area = (x1 - x0) * (y1 - y0)
        for i in range(h):
            oy = max(0.0, min(i + 1, y1) - max(i, y0))
            if oy == 0:
                continue
            for j in range(w):
                ox = max(0.0, min(j + 1, x1) - max(j, x0))
                out[i, j] += float(values[p]) * ox * oy / area
    return out


views_strategy = st.lists(
    st.tuples(
        st.integers(1, 4), st.integers(1, 4),  # grid
        st.floats(-6, 8), st.floats(-6, 8), st.floats(2, 14), st.floats(2, 14),  # x0, y0, width, height
    ),
    min_size=1, max_size=3,
)


@settings(max_examples=40, deadline=None)
@given(views=views_strategy, hw=st.tuples(st.integers(1, 9), st.integers(1, 9)), seed=st.integers(0, 1000))
def test_render_equals_the_per_pixel_reference(views, hw, seed):
    vs = [View(f"v{i}", (r, c), (x0, y0, x0 + bw, y0 + bh)) for i, (r, c, x0, y0, bw, bh) in enumerate(views)]
    n = sum(v.n_patches for v in vs)
    layout = ImageLayout(hw, vs, torch.arange(3))
    values = torch.from_numpy(np.random.default_rng(seed).normal(size=n))
    torch.testing.assert_close(layout.render(values), slow_render(layout, values), rtol=1e-9, atol=1e-9)


def test_render_conserves_the_relevance_inside_the_image():
    # A 3×2 grid over (−2, −4)–(10, 8) on a 6×8 image: each patch is 6 px wide, 4 px high.
    layout = ImageLayout((6, 8), [View("v", (3, 2), (-2, -4, 10, 8))], torch.arange(6))
    values = torch.arange(1.0, 7.0, dtype=torch.float64)
    inside = []
    for x0, y0, x1, y1 in layout.patch_boxes().tolist():
        fx = max(0.0, min(x1, 8) - max(x0, 0)) / (x1 - x0)
        fy = max(0.0, min(y1, 6) - max(y0, 0)) / (y1 - y0)
        inside.append(fx * fy)
    assert float(layout.render(values).sum()) == pytest.approx(float((values * torch.tensor(inside)).sum()))


def test_overlapping_views_add_up():
    base = View("base", (2, 2), (0, 0, 8, 8))
    tile = View("tile 0,0", (2, 2), (0, 0, 4, 4))
    both = ImageLayout((8, 8), [base, tile], torch.arange(8))
    values = torch.rand(8, dtype=torch.float64)
    alone_base = ImageLayout((8, 8), [base], torch.arange(4)).render(values[:4])
    alone_tile = ImageLayout((8, 8), [tile], torch.arange(4)).render(values[4:])
    torch.testing.assert_close(both.render(values), alone_base + alone_tile)


def test_a_hot_patch_lands_on_its_box_and_batches_render_alike():
    layout = ImageLayout.single_view((24, 40), (4, 4), (0, -8, 40, 32), torch.arange(16))
    values = torch.zeros(16, dtype=torch.float64)
    values[6] = 1.0  # row 1, col 2: x in [20, 30), y in [2, 12) - 8 → [2, 12)
    m = layout.render(values)
    ys, xs = torch.nonzero(m > 0, as_tuple=True)
    assert (int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())) == (2, 11, 20, 29)
    assert float(m.max()) == pytest.approx(1 / 100)  # a density: the patch's 10×10 pixels share its relevance
    batch = torch.stack([values, 2 * values])
    torch.testing.assert_close(layout.render(batch)[1], 2 * m)


def test_smooth_rendering_keeps_the_scale_and_the_peak():
    # 5-px patches: pixel 7's center is patch (1, 1)'s center, where interpolation returns the patch's own value.
    layout = ImageLayout.single_view((20, 20), (4, 4), (0, 0, 20, 20), torch.arange(16))
    values = torch.zeros(16, dtype=torch.float64)
    values[5] = 25.0
    smooth, exact = layout.render(values, smooth=True), layout.render(values)
    assert float(smooth.max()) == pytest.approx(float(exact.max())) == pytest.approx(1.0)  # 25 over 25 px
    assert np.unravel_index(int(smooth.argmax()), (20, 20)) == (7, 7)
    assert layout.render(values, size=(8, 8)).shape == (8, 8)


def test_weights_rows():
    w = box_weights(torch.tensor([-1.0, 1.5, 3.0]), 3)
    assert w.sum(1).tolist() == pytest.approx([0.6, 1.0])
    lw = linear_weights(0.0, 6.0, 3, 6)
    assert lw.sum(0).tolist() == pytest.approx([1.0] * 6)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="strictly increasing"):
        ImageLayout((4, 4), [View("v", 2, (0, 0, 4, 4))], torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="query_to_patch must be"):
        ImageLayout((4, 4), [View("v", 2, (0, 0, 4, 4))], torch.arange(3), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="placeholder tokens carry no patch"):
        ImageLayout((4, 4), [View("v", 2, (0, 0, 4, 4))], torch.arange(2), torch.ones(2, 4),
                    torch.tensor([True, False]))
    with pytest.raises(ValueError, match="box must be"):
        View("v", 2, (0, 0, 0, 4))
    with pytest.raises(ValueError, match="identity connector"):
        ImageLayout.single_view((4, 4), 2, (0, 0, 4, 4), torch.arange(3))


def test_multi_view_explanation_round_trip(tmp_path):
    views = [View("base", (2, 2), (0, 0, 8, 6)), View("tile 0,1", (2, 2), (4, 0, 8, 3))]
    q2p = torch.zeros(9, 8, dtype=torch.float64)
    q2p[torch.arange(4), torch.arange(4)] = 1
    q2p[torch.arange(5, 9), torch.arange(4, 8)] = 1  # token 4 is a newline placeholder
    placeholder = torch.zeros(9, dtype=torch.bool)
    placeholder[4] = True
    layout = ImageLayout((6, 8), views, torch.arange(10, 19), q2p, placeholder, rule="identity")
    t2q = torch.rand(2, 9, dtype=torch.float64)
    e = Explanation(method="rgae", target_text="a b", output_tokens=["a", "b"], text_to_patch=t2q @ q2p,
                    text_to_query=t2q, query_to_patch=q2p, layout=layout,
                    image=np.zeros((6, 8, 3), np.uint8))
    assert e.patch_grid is None and e.n_patches == 8 and e.image_map(word="b").shape == (6, 8)
    with pytest.raises(ValueError, match="several views"):
        e.patch_map()
    loaded = Explanation.load(e.save(tmp_path / "e"))
    assert loaded.layout.to_dict() == layout.to_dict()
    assert torch.equal(loaded.layout.placeholder, placeholder) and torch.equal(loaded.layout.query_to_patch, q2p)
    torch.testing.assert_close(loaded.image_map(), e.image_map())
    torch.testing.assert_close(e.query_image_map(5), layout.render(q2p[5]))


# ---- geometry: what the processors do to pixels -----------------------------------------------------------------
def _changed_centroid(processor_call, image, y0, y1, x0, x1):
    base = processor_call(image)
    bumped = image.copy()
    bumped[y0:y1, x0:x1] = 255 - bumped[y0:y1, x0:x1]
    diff = np.abs(processor_call(bumped) - base).sum(0)
    ys, xs = np.nonzero(diff > 1e-3 * diff.max())
    return (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2


@pytest.mark.parametrize("image_hw", [(24, 40), (40, 24), (33, 33)])
def test_resize_crop_box_places_pixels_where_the_clip_processor_puts_them(image_hw):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image = np.full((*image_hw, 3), 128, np.uint8)

    def call(img):
        return ip(images=img, return_tensors="np")["pixel_values"][0]

    bx0, by0, bx1, by1 = resize_crop_box(ip, image_hw)
    h, w = image_hw
    # A block in the middle of the kept region: where the box maps it is where the processor puts it (±1 px).
    yc, xc = int((max(by0, 0) + min(by1, h)) / 2), int((max(bx0, 0) + min(bx1, w)) / 2)
    cy, cx = _changed_centroid(call, image, yc - 3, yc + 3, xc - 3, xc + 3)
    assert abs(cy - (yc - by0) * 32 / (by1 - by0)) <= 1.0 and abs(cx - (xc - bx0) * 32 / (bx1 - bx0)) <= 1.0


def test_content_box_view_of_the_deco_processors_padding():
    from tests.tiny import tiny_deco_model, tiny_processor

    model = tiny_deco_model("mlp2x_gelu")
    proc = tiny_processor(model)
    image = np.full((24, 40, 3), 128, np.uint8)
    info = proc.prepare_image(image)
    box = content_box_view(info.content_box, info.model_image.shape[:2], (24, 40))
    assert box == pytest.approx((0.0, -8.0, 40.0, 32.0))
