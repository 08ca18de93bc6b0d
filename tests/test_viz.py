"""rgae.viz: overlay geometry and normalization, figure content read back in pixel space, export and naming."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from rgae import Explanation, viz
from rgae.viz.naming import MAX_SLUG_BYTES

JET_HIGH = np.array(matplotlib.colormaps["jet"](1.0)[:3]) * 255
JET_LOW = np.array(matplotlib.colormaps["jet"](0.0)[:3]) * 255


def box_of(i, j, size, grid):
    """Pixels of patch (i, j) by the contract: x ∈ [j·W/gw, (j+1)·W/gw), y ∈ [i·H/gh, (i+1)·H/gh)."""
    (h, w), (gh, gw) = size, grid
    ys = np.arange(h)[(np.arange(h) * gh >= i * h) & (np.arange(h) * gh < (i + 1) * h)]
    xs = np.arange(w)[(np.arange(w) * gw >= j * w) & (np.arange(w) * gw < (j + 1) * w)]
    return ys, xs


def hot_map(grid, i, j, dtype=np.float64):
    m = np.zeros(grid, dtype=dtype)
    m[i, j] = 1.0
    return m


def make_expl(patch_grid=(4, 4), query_grid=(2, 2), image_hw=(48, 48), q2p="pool", t2q=None, words=None,
              method="rgae", projector="qformer2_144", text="A pot of green plants", view_box=None):
    words = words or text.split()
    t, n, m = len(words), patch_grid[0] * patch_grid[1], query_grid[0] * query_grid[1]
    gen = torch.Generator().manual_seed(0)
    if q2p == "pool":
        from rgae.rules import pooling_map

        q2p = pooling_map(patch_grid, query_grid)
    elif q2p == "identity":
        q2p = torch.eye(n)
    t2q = torch.rand(t, m, generator=gen) if t2q is None else t2q
    image = (np.random.default_rng(0).integers(0, 255, (*image_hw, 3))).astype(np.uint8)
    layout = None
    if view_box is not None:  # the patch grid covers view_box of the (original) image, e.g. padding around it
        from rgae.layout import ImageLayout

        layout = ImageLayout.single_view(image_hw, patch_grid, view_box, torch.arange(m), q2p.double(), rule="pooling",
                                         query_grid=query_grid)
    return Explanation(method=method, target_text=text, output_tokens=words, text_to_patch=t2q @ q2p,
                       patch_grid=patch_grid, text_to_query=t2q, query_to_patch=q2p, query_grid=query_grid,
                       image=image, projector_type=projector, layout=layout)


def render_png(fig: Figure, dpi: int = 100) -> np.ndarray:
    """The figure as RGB pixels, without bbox cropping, so data coordinates map to pixels via transData."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return np.asarray(Image.open(buf).convert("RGB")).astype(float)


def data_to_pixel(fig: Figure, ax, x: float, y: float, dpi: int = 100) -> tuple[int, int]:
    fig.set_dpi(dpi)
    FigureCanvasAgg(fig).draw()  # layout must be final before reading transforms
    px, py = ax.transData.transform((x, y))
    height = fig.get_size_inches()[1] * dpi
    return int(round(height - py)), int(round(px))  # (row, col) in the PNG (origin top-left)


# ---- overlay geometry ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize(
    "size,grid,hot",
    [((96, 96), (12, 12), (3, 7)), ((64, 96), (4, 6), (2, 5)), ((64, 96), (4, 6), (0, 0)), ((50, 70), (3, 5), (1, 3)),
     ((40, 30), (5, 2), (4, 1))],
)
def test_single_hot_patch_lands_in_its_box(size, grid, hot, interpolation):
    image = np.zeros((*size, 3), np.uint8)
    out = viz.overlay(image, hot_map(grid, *hot), alpha=1.0, cmap="gray", interpolation=interpolation)
    assert out.shape == (*size, 3) and out.dtype == np.uint8
    ys, xs = box_of(*hot, size, grid)
    brightness = out[..., 0].astype(int)
    hottest = np.argwhere(brightness == brightness.max())
    assert set(hottest[:, 0]) <= set(ys) and set(hottest[:, 1]) <= set(xs)
    if interpolation == "nearest":  # exactly the box, nothing else
        expected = np.zeros(size, bool)
        expected[np.ix_(ys, xs)] = True
        np.testing.assert_array_equal(brightness == 255, expected)
        assert np.all(brightness[~expected] == 0)


def test_default_jet_is_rgb_not_bgr():
    image = np.full((32, 32, 3), 128, np.uint8)
    out = viz.overlay(image, hot_map((2, 2), 0, 0), alpha=1.0, interpolation="nearest").astype(float)
    np.testing.assert_allclose(out[0, 0], np.rint(JET_HIGH))  # dark red in channel 0 (RGB)
    np.testing.assert_allclose(out[-1, -1], np.rint(JET_LOW))  # dark blue in channel 2
    assert out[0, 0, 0] > out[0, 0, 2] and out[-1, -1, 2] > out[-1, -1, 0]


@pytest.mark.parametrize(
    "size,grid", [((96, 96), (12, 12)), ((64, 96), (4, 6)), ((37, 53), (5, 7)), ((8, 8), (16, 16))]
)
def test_bilinear_matches_torch_interpolate(size, grid):
    m = torch.rand(grid, dtype=torch.float64)
    ours = viz.upsample(m, size, "bilinear")
    ref = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_nearest_matches_box_definition():
    size, grid = (50, 70), (3, 5)
    m = np.arange(15, dtype=float).reshape(grid)
    ours = viz.upsample(m, size, "nearest")
    for i in range(3):
        for j in range(5):
            ys, xs = box_of(i, j, size, grid)
            assert np.all(ours[np.ix_(ys, xs)] == m[i, j])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_maps_of_any_float_dtype(dtype):
    image = np.full((24, 24, 3), 90, np.uint8)
    ref = np.random.default_rng(1).random((3, 3))
    t = torch.tensor(ref, dtype=dtype, requires_grad=dtype != torch.bfloat16)
    out = viz.overlay(image, t)
    expected = viz.overlay(image, t.detach().float().numpy())
    np.testing.assert_array_equal(out, expected)
    # PIL input gives the same pixels as the array.
    np.testing.assert_array_equal(viz.overlay(Image.fromarray(image), t.detach().float()), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_maps():
    image = np.full((24, 24, 3), 90, np.uint8)
    m = torch.rand(3, 3, device="cuda", dtype=torch.bfloat16)
    np.testing.assert_array_equal(viz.overlay(image, m), viz.overlay(image, m.float().cpu()))


# ---- normalization ---------------------------------------------------------------------------------------------
def test_normalizations_by_hand():
    m = np.array([[0.0, 2.0], [4.0, 8.0]])
    image = np.zeros((2, 2, 3), np.uint8)
    gray = lambda **kw: viz.overlay(image, m, alpha=1.0, cmap="gray", interpolation="nearest", **kw)[..., 0]
    np.testing.assert_array_equal(gray(), np.rint(255 * np.array([[0, 0.25], [0.5, 1.0]])))
    np.testing.assert_array_equal(gray(normalize="global", vmin=0.0, vmax=16.0),
                                  np.rint(255 * np.array([[0, 0.125], [0.25, 0.5]])))
    np.testing.assert_array_equal(gray(normalize="global", vmin=2.0, vmax=4.0),
                                  np.rint(255 * np.array([[0, 0], [1.0, 1.0]])))  # clipped to the shared range
    small = m / 10.0
    out = viz.overlay(image, small, alpha=1.0, cmap="gray", interpolation="nearest", normalize="none")[..., 0]
    np.testing.assert_array_equal(out, np.rint(255 * small))
    # alpha blends linearly with the image.
    white = np.full((2, 2, 3), 255, np.uint8)
    half = viz.overlay(white, m, alpha=0.5, cmap="gray", interpolation="nearest")[..., 0]
    gray_lut = np.asarray(matplotlib.colormaps["gray"](np.array([[0, 0.25], [0.5, 1.0]])))[..., 0]  # 256-entry LUT
    np.testing.assert_array_equal(half, np.rint(127.5 + 127.5 * gray_lut))


@pytest.mark.parametrize("normalize,kw", [("per_map", {}), ("global", {"vmin": 3.0, "vmax": 3.0}), ("none", {})])
@pytest.mark.parametrize("value", [0.0, 3.0])
def test_constant_and_zero_maps_are_finite_low_end(value, normalize, kw):
    image = np.full((16, 16, 3), 100, np.uint8)
    with np.errstate(all="raise"):  # any division by zero or invalid op would raise here
        out = viz.overlay(image, np.full((4, 4), value), alpha=1.0, normalize=normalize, **kw)
    assert out.dtype == np.uint8
    if normalize != "none" or value == 0.0:
        np.testing.assert_array_equal(out, np.broadcast_to(np.rint(JET_LOW), out.shape))


@pytest.mark.parametrize(
    "image,patch_map,kw",
    [
        (np.zeros((8, 8, 3), np.uint8), np.zeros((2, 2, 2)), {}),
        (np.zeros((8, 8, 3), np.uint8), np.zeros(4), {}),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((0, 3)), {}),
        (np.zeros((8, 8, 3), np.uint8), np.array([["a", "b"]]), {}),
        (np.zeros((8, 8, 3), np.uint8), np.ones((2, 2), bool), {}),
        (np.zeros((8, 8, 3), np.uint8), np.array([[np.nan, 1.0]]), {}),
        (np.zeros((8, 8, 3), np.float32), np.zeros((2, 2)), {}),
        (np.zeros((8, 8, 4), np.uint8), np.zeros((2, 2)), {}),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((2, 2)), {"interpolation": "cubic"}),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((2, 2)), {"normalize": "zscore"}),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((2, 2)), {"normalize": "global"}),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((2, 2)), {"normalize": "global", "vmin": 2.0, "vmax": 1.0}),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((2, 2)), {"vmin": 0.0, "vmax": 1.0}),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((2, 2)), {"alpha": 1.5}),
        (np.zeros((8, 8, 3), np.uint8), torch.zeros(2, 2, dtype=torch.complex64), {}),
    ],
)
def test_bad_input_raises_value_error(image, patch_map, kw):
    with pytest.raises(ValueError):
        viz.overlay(image, patch_map, **kw)


# ---- figures: content in pixel space ---------------------------------------------------------------------------
def test_padded_view_is_drawn_over_the_original_image():
    # A 64×96 image letterboxed to 96×96 (16 rows of padding above and below), 12×12 patches of 8 px; hot patch (5, 9).
    e = make_expl(patch_grid=(12, 12), query_grid=(12, 12), image_hw=(64, 96), q2p="identity",
                  t2q=torch.from_numpy(hot_map((12, 12), 5, 9).reshape(1, -1)).float(), words=["plants"],
                  text="plants", view_box=(0, -16, 96, 80))
    fig = viz.plot_text_to_image(e, interpolation="nearest", alpha=1.0, cmap="gray")
    shown = np.asarray(fig.axes[0].images[0].get_array())
    assert shown.shape == (64, 96, 3)
    hot = np.argwhere(shown[..., 0] == 255)
    # Patch (5, 9) is y ∈ [40, 48), x ∈ [72, 80) in the padded square → y ∈ [24, 32) of the original image.
    assert hot[:, 0].min() == 24 and hot[:, 0].max() == 31 and hot[:, 1].min() == 72 and hot[:, 1].max() == 79


@pytest.mark.parametrize("style", ["grid", "heatmap"])
def test_query_cells_land_in_the_right_place(style):
    qh, qw, hot = 3, 4, (2, 1)
    t2q = torch.from_numpy(hot_map((qh, qw), *hot).reshape(1, -1)).float()
    e = make_expl(patch_grid=(6, 8), query_grid=(qh, qw), t2q=t2q, words=["pot"], text="pot")
    fig = viz.plot_text_to_query(e, style=style, top_k=1)
    ax = fig.axes[0]
    pixels = render_png(fig)
    row, col = data_to_pixel(fig, ax, hot[1], hot[0])
    np.testing.assert_allclose(pixels[row, col], JET_HIGH, atol=3)  # hot cell: jet's top color
    for r, c in [(0, 0), (0, 3), (2, 3), (1, 1)]:
        row, col = data_to_pixel(fig, ax, c, r)
        np.testing.assert_allclose(pixels[row, col], JET_LOW, atol=3)
    if style == "grid":
        labels = {t.get_text(): t.get_position() for t in ax.texts}
        hot_index = hot[0] * qw + hot[1]
        assert labels[f"{hot_index}\n1.00"] == (hot[1], hot[0])
        assert labels[f"{qw * qh - 1}\n0.00"] == (qw - 1, qh - 1)
        frames = [p for p in ax.patches if p.get_edgecolor()[0] > 0.8 and p.get_edgecolor()[1] < 0.2]
        assert [(p.get_x(), p.get_y()) for p in frames] == [(hot[1] - 0.5, hot[0] - 0.5)]


@pytest.mark.parametrize("q2p", ["identity", "pool"])
def test_query_mosaic_tiles_show_each_querys_patches(q2p):
    patch_grid, query_grid = (4, 4), ((4, 4) if q2p == "identity" else (2, 2))
    e = make_expl(patch_grid=patch_grid, query_grid=query_grid, image_hw=(40, 40), q2p=q2p)
    mosaic, (th, tw), (qh, qw) = viz.query_mosaic(e, alpha=1.0, cmap="gray", interpolation="nearest",
                                                  tile_px=40, gap_px=3, grayscale=True)
    assert (th, tw) == (40, 40) and (qh, qw) == query_grid
    assert mosaic.shape == (qh * 43 - 3, qw * 43 - 3, 3)
    window = 10 if q2p == "identity" else 20  # patch = 10 px; a 2×2 pooling window = 20 px
    for q in range(qh * qw):
        r, c = divmod(q, qw)
        tile = mosaic[r * 43: r * 43 + 40, c * 43: c * 43 + 40, 0]
        hot = np.argwhere(tile == 255)
        assert hot[:, 0].min() == r * window and hot[:, 0].max() == (r + 1) * window - 1
        assert hot[:, 1].min() == c * window and hot[:, 1].max() == (c + 1) * window - 1
        assert len(hot) == window * window


def test_every_kind_returns_a_figure_and_no_pyplot_state():
    import matplotlib.pyplot as plt

    e = make_expl()
    before = plt.get_fignums()
    for kind in viz.PLOT_KINDS:
        assert isinstance(viz.plot(e, kind=kind), Figure)
    assert isinstance(e.plot("text_to_image", word="green"), Figure)
    assert plt.get_fignums() == before  # nothing left open in pyplot
    with pytest.raises(ValueError, match="kind"):
        viz.plot(e, kind="sankey")


def test_words_merge_subword_tokens():
    e = make_expl(words=["A", "▁pot", "▁gre", "en"], text="A pot green", patch_grid=(4, 4), query_grid=(2, 2))
    fig = viz.plot_words(e, include_sentence=False)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["“A”", "“pot”", "“green”"]
    # The "green" panel shows the mean of the two subword maps.
    np.testing.assert_allclose(e.word_text_to_patch("green"), e.text_to_patch[2:4].mean(0))


def test_methods_without_queries():
    e = make_expl()
    g = Explanation(method="gradcam", target_text=e.target_text, output_tokens=e.output_tokens,
                    text_to_patch=e.text_to_patch, patch_grid=e.patch_grid, image=e.image)
    assert len(viz.plot_decomposition(g).axes) == 2  # the R_t2i panel and its colorbar
    with pytest.raises(ValueError, match="Text-to-Query"):
        viz.plot_text_to_query(g)
    with pytest.raises(ValueError, match="Query-to-Patch"):
        viz.plot_query_to_image(g)


def test_comparison_global_has_one_shared_colorbar():
    a = make_expl(method="rgae")
    b = make_expl(method="rollout", t2q=5 * torch.rand(5, 4))
    fig = viz.plot_comparison([a, b], rows="method", words=["pot", "plants"], normalize="global")
    image_axes = [ax for ax in fig.axes if ax.images]
    colorbars = [ax for ax in fig.axes if not ax.images and ax.get_label() == "<colorbar>"]
    assert len(image_axes) == 2 * 3 and len(colorbars) == 1
    lo = min(float(e.patch_map(word=w).min()) for e in (a, b) for w in ("pot", "plants"))
    hi = max(float(e.patch_map(word=w).max()) for e in (a, b) for w in ("pot", "plants"))
    np.testing.assert_allclose(colorbars[0].get_ylim(), (lo, hi), rtol=1e-6)
    assert [ax.get_ylabel() for ax in image_axes[::3]] == ["rgae", "rollout"]
    by_projector = viz.plot_comparison({"linear": a, "qformer": b}, words=["pot"])
    assert isinstance(by_projector, Figure)


# ---- export and naming -----------------------------------------------------------------------------------------
def test_save_figures_original_names(tmp_path):
    e = make_expl(text="A pot of green plants", method="rgae", projector="qformer2_144")
    paths = viz.save_figures(e, tmp_path, dpi=40, words=False)
    names = {p.name for p in paths}
    stem = "rgae-A-pot-of-green-plants-qformer2_144-"
    expected = [("R_t_i", ""), ("R_t_q", ""), ("R_t_q", "_grid"), ("R_q_i", ""), ("decomposition", ""),
                ("decomposition", "_grid")]
    assert names == {f"{prefix}-{stem}{suffix}.png" for prefix, suffix in expected}
    # The two names the original tool's README shows, verbatim.
    assert "R_t_q-rgae-A-pot-of-green-plants-qformer2_144-.png" in names
    assert "R_t_q-rgae-A-pot-of-green-plants-qformer2_144-_grid.png" in names
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no temporary files left behind
    for p in paths:
        with Image.open(p) as im:
            im.verify()


def test_png_pdf_svg_are_valid(tmp_path):
    e = make_expl()
    g = Explanation(method="gradcam", target_text="A pot", output_tokens=["A", "pot"],
                    text_to_patch=e.text_to_patch[:2], patch_grid=e.patch_grid, image=e.image,
                    projector_type="qformer2_144")
    paths = viz.save_figures(g, tmp_path, formats=("png", "pdf", "svg"), dpi=40, words=False)
    assert [p.name for p in paths] == [f"R_t_i-gradcam-A-pot-qformer2_144-.{ext}" for ext in ("png", "pdf", "svg")]
    with Image.open(paths[0]) as im:
        im.verify()
    assert paths[1].read_bytes().startswith(b"%PDF") and paths[1].read_bytes().rstrip().endswith(b"%%EOF")
    root = ET.parse(paths[2]).getroot()
    assert root.tag.endswith("svg") and root.find(".//{http://www.w3.org/2000/svg}image") is not None


def test_save_figures_per_word_files(tmp_path):
    e = make_expl(text="green plants", words=["green", "▁pla", "nts"])
    g = Explanation(method="rollout", target_text=e.target_text, output_tokens=e.output_tokens,
                    text_to_patch=e.text_to_patch, patch_grid=e.patch_grid, image=e.image, projector_type="linear")
    names = sorted(p.name for p in viz.save_figures(g, tmp_path, dpi=40))
    stem = "R_t_i-rollout-green-plants-linear-"
    assert names == [f"{stem}{suffix}.png" for suffix in ("", "_w00-green", "_w01-plants", "_words")]


def test_png_size_follows_dpi(tmp_path):
    e = make_expl()
    fig = viz.plot_text_to_query(e)
    sizes = []
    for dpi in (50, 100):
        path = viz.save_figure(fig, tmp_path / f"f{dpi}.png", dpi=dpi)
        with Image.open(path) as im:
            sizes.append(im.size)
    assert abs(sizes[1][0] - 2 * sizes[0][0]) <= 3 and abs(sizes[1][1] - 2 * sizes[0][1]) <= 3
    w_in, h_in = fig.get_size_inches()
    assert sizes[1][0] <= w_in * 100 + 2 and sizes[1][1] <= h_in * 100 + 2  # tight bbox only trims


def test_save_figures_skips_query_figures_without_queries(tmp_path):
    e = make_expl()
    g = Explanation(method="gradcam", target_text="A pot", output_tokens=["A", "pot"],
                    text_to_patch=e.text_to_patch[:2], patch_grid=e.patch_grid, image=e.image,
                    projector_type="mlp2x_gelu")
    names = sorted(p.name for p in viz.save_figures(g, tmp_path, words=False))
    assert names == ["R_t_i-gradcam-A-pot-mlp2x_gelu-.png"]
    with pytest.raises(ValueError, match="formats"):
        viz.save_figures(g, tmp_path, formats=("jpg",))


@pytest.mark.parametrize(
    "text,expected",
    [("A pot of green plants", "A-pot-of-green-plants"), ("Crème brûlée / dessert", "Creme-brulee-dessert"),
     ("a/b\\c:d*e?f", "a-b-c-d-e-f"), ("tab\there\nnew\x00line", "tab-here-new-line"), ("  ", "empty"),
     ("../..", "empty"), ("CON", "CON_"), ("nul", "nul_"), ("ﬁne Ⅻ", "fine-XII"), ("猫が好き", "猫が好き")],
)
def test_slugify(text, expected):
    assert viz.slugify(text) == expected


def test_slug_long_and_unicode_texts_are_safe_files(tmp_path):
    long_a = "a very long caption " * 40
    long_b = long_a + "with a different ending"
    sa, sb = viz.slugify(long_a), viz.slugify(long_b)
    assert sa != sb and len(sa.encode()) <= MAX_SLUG_BYTES and len(sb.encode()) <= MAX_SLUG_BYTES
    assert sa.startswith("a-very-long-caption-a-very")
    cjk = "猫" * 200
    assert len(viz.slugify(cjk).encode()) <= MAX_SLUG_BYTES
    for text in (long_a, cjk, "a/b\\c", "\x01\x7f", "emoji 🐈 ok", "Ünïcödé"):
        name = viz.figure_filename("R_t_q", "rgae", text, "qformer2_144", suffix="_grid")
        assert "/" not in name and "\\" not in name and len(name.encode()) < 255
        (tmp_path / name).write_bytes(b"x")  # the filesystem accepts it
    assert viz.figure_filename("R_t_q", "rgae", "A pot of green plants", "qformer2_144", suffix="_grid") == (
        "R_t_q-rgae-A-pot-of-green-plants-qformer2_144-_grid.png"
    )


def test_repr_png_returns_png_bytes():
    e = make_expl()
    data = e._repr_png_()
    assert isinstance(data, bytes) and data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as im:
        assert im.size[0] > 100 and im.size[1] > 50


def test_written_png_shows_the_hot_query_cell_where_the_axes_put_it(tmp_path):
    qh, qw, hot = 4, 4, (1, 3)
    t2q = torch.from_numpy(hot_map((qh, qw), *hot).reshape(1, -1)).float()
    e = make_expl(patch_grid=(8, 8), query_grid=(qh, qw), t2q=t2q, words=["pot"], text="pot")
    fig = viz.plot_text_to_query(e, style="heatmap")
    dpi = 80
    path = viz.save_figure(fig, tmp_path / "t2q.png", dpi=dpi)
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(float)
    # The file is cropped to the tight bbox (+ pad): shift display coordinates by its corner.
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    bbox = fig.get_tightbbox(canvas.get_renderer()).padded(0.03)
    assert abs(pixels.shape[1] - bbox.width * dpi) <= 2 and abs(pixels.shape[0] - bbox.height * dpi) <= 2
    ax = fig.axes[0]
    for (r, c), color in [(hot, JET_HIGH), ((0, 0), JET_LOW), ((3, 3), JET_LOW), ((1, 2), JET_LOW)]:
        px, py = ax.transData.transform((c, r))
        row, col = int(round(bbox.y1 * dpi - py)), int(round(px - bbox.x0 * dpi))
        np.testing.assert_allclose(pixels[row, col], color, atol=3)


@pytest.mark.slow
def test_tiny_model_explanation_end_to_end(tmp_path):
    """A real R-GAE explanation of a tiny random model (tests/tiny.py) renders and exports every figure."""
    tiny = pytest.importorskip("tests.tiny")
    try:
        from rgae import RGAE
    except (ImportError, AttributeError):
        pytest.skip("rgae.RGAE is not available")
    model = tiny.tiny_deco_model("avgpool2_4", image_size=32)
    image = np.random.default_rng(0).integers(0, 255, (24, 40, 3)).astype(np.uint8)  # padded to square
    e = RGAE(model, tiny.tiny_processor(model)).attribute(image, target="a red circle")
    assert e.image.shape == (24, 40, 3) and e.layout.views[0].box == pytest.approx((0.0, -8.0, 40.0, 32.0))
    paths = viz.save_figures(e, tmp_path, words=False, dpi=50)
    names = {p.name for p in paths}
    assert {"R_t_i-rgae-a-red-circle-avgpool2_4-.png", "R_t_q-rgae-a-red-circle-avgpool2_4-_grid.png",
            "R_q_i-rgae-a-red-circle-avgpool2_4-.png", "decomposition-rgae-a-red-circle-avgpool2_4-.png"} <= names
    shown = np.asarray(viz.plot_text_to_image(e).axes[0].images[0].get_array())
    assert shown.shape[:2] == (24, 40)  # drawn over the original image, the padding gone
    assert e._repr_png_().startswith(b"\x89PNG")


def test_synthetic_explanation_composes_like_rgae():
    e = viz.synthetic_explanation(patch_grid=(6, 6), query_grid=(3, 3), image_size=(30, 40))
    torch.testing.assert_close(e.text_to_patch, e.text_to_query @ e.query_to_patch)
    assert e.image.shape == (30, 40, 3) and e.image.dtype == np.uint8
    torch.testing.assert_close(viz.synthetic_explanation(projector="mlp2x_gelu", query_grid=(8, 8)).query_to_patch,
                               torch.eye(64))
    with pytest.raises(ValueError, match="query_grid"):
        viz.synthetic_explanation(projector="linear", query_grid=(4, 4))


# ---- comparable figures: shared scales, notes, readable Query-to-Image, all-zero maps ------------------------------
def _colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def _texts(fig) -> list[str]:
    found = [t.get_text() for ax in fig.axes for t in ax.texts] + [ax.get_title() for ax in fig.axes]
    return found + ([fig._suptitle.get_text()] if fig._suptitle is not None else [])


def test_decomposition_global_puts_t2i_and_t2q_on_one_scale():
    # T2Q in [0, 0.1] through Q2P = 10·I: the sentence T2I map reaches 10× the T2Q values.
    t2q = torch.tensor([[0.0, 0.05, 0.1, 0.02]])
    e = make_expl(patch_grid=(2, 2), query_grid=(2, 2), q2p=10 * torch.eye(4), t2q=t2q, words=["pot"], text="pot")
    per_map = viz.plot_decomposition(e)
    shared = viz.plot_decomposition(e, normalize="global")
    assert [c.get_xlabel() for c in _colorbars(per_map)] == [
        "relevance (min–max of each panel; $R_{q2i}$: of each query)"]
    labels = [c.get_xlabel() for c in _colorbars(shared)]
    assert labels == ["relevance (one scale for $R_{t2i}$ and $R_{t2q}$)",
                      "Query-to-Patch weight (one scale for all queries)"]
    np.testing.assert_allclose(_colorbars(shared)[0].get_xlim(), (0.0, 1.0), atol=1e-6)  # min T2Q .. max T2I
    np.testing.assert_allclose(_colorbars(shared)[1].get_xlim(), (0.0, 10.0), atol=1e-6)
    # The hottest query cell: jet's top color on its own scale, one tenth of the way up on the shared one.
    hot = divmod(2, 2)  # query 2 on the 2×2 grid
    cell = np.asarray(per_map.axes[1].images[0].get_array())[hot] * 255
    np.testing.assert_allclose(cell, JET_HIGH, atol=1)
    cell = np.asarray(shared.axes[1].images[0].get_array())[hot]
    np.testing.assert_allclose(cell, viz.colorize(np.array(0.1), "jet"), atol=1e-6)


def test_query_to_image_global_scale_and_labels():
    q2p = torch.eye(4) * torch.tensor([[1.0], [2.0], [3.0], [4.0]])  # query q has weight q + 1
    e = make_expl(patch_grid=(2, 2), query_grid=(2, 2), q2p=q2p)
    assert [c.get_ylabel() for c in _colorbars(viz.plot_query_to_image(e))] == [
        "Query-to-Patch weight (min–max per query)"]
    fig = viz.plot_query_to_image(e, normalize="global")
    (bar,) = _colorbars(fig)
    assert bar.get_ylabel() == "Query-to-Patch weight (one scale for all queries)"
    np.testing.assert_allclose(bar.get_ylim(), (0.0, 4.0))
    # Each query's own patch (query 0: top-left of tile 0; query 3: bottom-right of tile 3) at full opacity and
    # white (gray colormap) when each tile has its own scale; on the shared scale query 0 is a quarter of the way.
    hot_pixels = {}
    for normalize in ("per_map", "global"):
        mosaic, *_ = viz.query_mosaic(e, alpha=1.0, cmap="gray", interpolation="nearest", tile_px=20, gap_px=0,
                                      normalize=normalize)
        hot_pixels[normalize] = (int(mosaic[0, 0, 0]), int(mosaic[20 + 10, 20 + 10, 0]))
    assert hot_pixels["per_map"] == (255, 255)
    assert hot_pixels["global"][1] == 255 and hot_pixels["global"][0] < 200


def test_144_queries_decomposition_shows_the_top_queries_labelled_and_framed():
    gen = torch.Generator().manual_seed(3)
    t2q = torch.rand(2, 144, generator=gen)
    e = make_expl(patch_grid=(12, 12), query_grid=(12, 12), q2p="identity", t2q=t2q, words=["a", "b"], text="a b",
                  image_hw=(96, 96))
    top16 = torch.argsort(t2q.mean(0), descending=True)[:16].tolist()
    fig = viz.plot_decomposition(e, top_k=5)
    q2i = fig.axes[2]
    assert "top 16 of 144 queries" in q2i.get_title()
    assert [int(t.get_text()) for t in q2i.texts] == top16  # each tile labelled with its query index
    frames = [p for p in q2i.patches if p.get_edgecolor()[0] > 0.8 and p.get_edgecolor()[1] < 0.2]
    assert len(frames) == 5
    t2q_frames = [p for p in fig.axes[1].patches if p.get_edgecolor()[0] > 0.8 and p.get_edgecolor()[1] < 0.2]
    assert len(t2q_frames) == 5  # the same queries framed in the R_t2q panel
    assert "red frames: the top-5 queries by sentence $R_{t2q}$" in fig._suptitle.get_text()
    assert len(viz.plot_decomposition(e, queries=None).axes[2].texts) == 0  # all 144, on the query grid
    # The standalone figure grows with the grid: 12×12 tiles get about 0.6 inch each.
    assert viz.plot_query_to_image(e).get_size_inches()[0] >= 7.0
    assert viz.plot_query_to_image(e, queries=4).get_size_inches()[0] < 5.0


def test_query_mosaic_of_chosen_queries_shows_their_patches():
    e = make_expl(patch_grid=(4, 4), query_grid=(4, 4), image_hw=(40, 40), q2p="identity")
    mosaic, (th, tw), grid = viz.query_mosaic(e, alpha=1.0, cmap="gray", interpolation="nearest", tile_px=40,
                                              gap_px=0, queries=[5, 14, 0])
    assert grid == (1, 3) or grid == (2, 2)
    cols = grid[1]
    for k, q in enumerate([5, 14, 0]):
        r, c = divmod(k, cols)
        tile = mosaic[r * 40: r * 40 + 40, c * 40: c * 40 + 40, 0]
        (ys, xs) = np.nonzero(tile == 255)
        assert (ys.min() // 10, xs.min() // 10) == divmod(q, 4) and len(ys) == 100
    with pytest.raises(ValueError, match="queries"):
        viz.query_mosaic(e, queries=[16])


def test_all_zero_map_says_no_relevance():
    e = make_expl(t2q=torch.zeros(5, 4))
    for fig in (viz.plot_text_to_image(e), viz.plot_words(e), viz.plot_comparison([e], words=["pot"]),
                viz.plot_decomposition(e)):
        assert any("no relevance" in t for t in _texts(fig))
    assert not any("no relevance" in t for t in _texts(viz.plot_text_to_image(make_expl())))
    (bar,) = _colorbars(viz.plot_text_to_image(e))
    assert bar.get_ylabel() == "relevance (constant map)" and [t.get_text() for t in bar.get_yticklabels()] == ["0"]
    # On a shared scale a constant non-zero map is a real value: no note; an all-zero one still gets it.
    half = make_expl(t2q=torch.cat([torch.zeros(1, 4), torch.rand(4, 4)]))
    fig = viz.plot_words(half, words=["A"], include_sentence=False, normalize="global")
    assert any("no relevance" in t for t in _texts(fig))


def test_note_reaches_every_title(tmp_path):
    e = make_expl()
    note = "out of domain: the models know nothing about photos"
    for fig in (viz.plot_comparison([e], words=["pot"], note=note), viz.plot_text_to_image(e, note=note),
                viz.plot_words(e, note=note), viz.plot_decomposition(e, note=note),
                viz.plot_query_to_image(e, note=note), viz.plot_text_to_query(e, note=note)):
        assert any(f"[{note}]" in " ".join(t.split()) for t in _texts(fig))
    specs = viz.figure_specs(e, words=True, note=note, normalize="global")
    assert specs and all(any(note in " ".join(t.split()) for t in _texts(make())) for _, _, make in specs)
    with pytest.raises(ValueError, match="unknown plot options"):
        viz.save_figures(e, tmp_path, words=False, title="x")


def test_words_colorbar_says_which_scale():
    e = make_expl()
    assert [c.get_ylabel() for c in _colorbars(viz.plot_words(e))] == ["relevance (min–max of each map)"]
    assert [c.get_ylabel() for c in _colorbars(viz.plot_words(e, normalize="global"))] == [
        "relevance (one scale for all panels)"]


def test_constant_text_to_query_frames_nothing():
    e = make_expl(patch_grid=(12, 12), query_grid=(12, 12), q2p="identity", t2q=torch.zeros(2, 144),
                  words=["a", "b"], text="a b", image_hw=(48, 48))
    fig = viz.plot_decomposition(e)  # 144 queries, all equally (ir)relevant: the first 16 tiles, no frames
    red = [p for ax in fig.axes for p in ax.patches if p.get_edgecolor()[0] > 0.8 and p.get_edgecolor()[1] < 0.2]
    assert not red and [int(t.get_text()) for t in fig.axes[2].texts] == list(range(16))
