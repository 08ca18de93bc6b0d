"""The interactive explorer (rgae.viz.explore): the page's data against rgae.viz.overlay, its size, escaping, the site
writer, and - in a real headless Chromium driven over the DevTools protocol - that it loads without console errors
or network requests, that clicking a word (or opening the page at ``#word=3``) moves the hottest overlay pixels into
that object's box on a shapes scene, and that a hostile caption is shown as text."""

from __future__ import annotations

import base64
import doctest
import fcntl
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rgae import Explanation
from rgae.layout import ImageLayout, View
from rgae.viz import explore, explore_sections, overlay, synthetic_explanation, write_site
from rgae.viz.explore import display_image, selection_map

SCENE_SEED = 2  # "a large yellow square left of a large blue circle left of a small red triangle": every word unique
# One word per object of that scene that R-GAE on the shipped MLP model localizes (pointing game hits; its map for
# "red" peaks on the patch just below the small triangle's box, so the triangle is named by its shape).
LOCALIZED = ("yellow", "circle", "triangle")
HOSTILE = 'a red <script>window.__pwned=1</script> <img src=x onerror="window.__pwned=2"> </script> "circle\''


# ---- helpers --------------------------------------------------------------------------------------------------------
def page_data(page_html: str) -> list[dict]:
    """The JSON data of every explorer on a page."""
    return [json.loads(m) for m in re.findall(r'<script type="application/json" class="rx-data">(.*?)</script>',
                                              page_html, flags=re.S)]


def decode_png(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def blend_like_the_page(base: np.ndarray, indices: np.ndarray, lut: list, alpha: float) -> np.ndarray:
    """What the page's script paints: rint((1 - alpha) * image + alpha * lut[index])."""
    colors = np.asarray(lut)[indices]
    return np.rint((1 - alpha) * base.astype(np.float64) + alpha * colors).astype(np.int64)


def invert_colormap(heat_rgb: np.ndarray, lut: list) -> np.ndarray:
    """Colormap index of each pixel's colour (the nearest LUT entry)."""
    table = np.asarray(lut)
    d = ((heat_rgb[..., None, :] - table[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def words_explanation(words: list[str], grid=(4, 4), **kw) -> Explanation:
    return Explanation(method="rgae", target_text=" ".join(words), output_tokens=words,
                       text_to_patch=torch.rand(len(words), grid[0] * grid[1]), patch_grid=grid,
                       image=np.full((32, 32, 3), 128, np.uint8), **kw)


# ---- the page's data is rgae.viz.overlay's picture ------------------------------------------------------------------
@pytest.mark.parametrize("image_size,display_px", [((64, 64), 336), ((96, 72), 200), ((500, 400), 336)])
def test_embedded_maps_repaint_exactly_the_overlay(image_size, display_px):
    e = synthetic_explanation(image_size=image_size)
    page = explore(e, alpha=0.4, display_px=display_px)
    data = page_data(page.html)[0]
    panel = data["panels"][0]
    base = decode_png(data["images"][panel["image"]])
    assert np.array_equal(base, display_image(e, display_px))
    assert max(base.shape[:2]) <= display_px
    if max(image_size) <= display_px:  # enlarged by a whole factor: each pixel a clean block
        k = base.shape[0] // image_size[0]
        assert k == display_px // max(image_size) and np.array_equal(base[::k, ::k], e.image)
    for sel, word in enumerate([None, *range(len(e.words))]):
        painted = blend_like_the_page(base, decode_png(panel["t2i"]["png"][sel]), data["lut"], data["alpha"])
        m = selection_map(e, word=word, size=base.shape[:2])  # what the figures draw, at the page's size
        reference = overlay(base, m, alpha=0.4).astype(np.int64)
        assert np.array_equal(painted, reference)
        assert panel["t2i"]["lo"][sel] == pytest.approx(float(m.min()), rel=1e-5)
        assert panel["t2i"]["hi"][sel] == pytest.approx(float(m.max()), rel=1e-5)


def test_query_data_rows_and_top_queries():
    e = synthetic_explanation(patch_grid=(8, 8), query_grid=(4, 4))
    panel = page_data(explore(e).html)[0]["panels"][0]
    t2q = decode_png(panel["t2q"]["png"])
    q2p = decode_png(panel["q2p"]["png"])
    assert t2q.shape == (1 + len(e.words), 16) and q2p.shape == (16, 64) and panel["t2q"]["grid"] == [4, 4]
    for sel, word in enumerate([None, *range(len(e.words))]):
        values = e.query_values(word=word).numpy()
        assert panel["t2q"]["top"][sel] == int(values.argmax())
        assert t2q[sel].argmax() == values.argmax() and t2q[sel].min() == 0 and t2q[sel].max() == 255
    # Average pooling 8x8 -> 4x4: query 5 = row 1, column 1 covers patches rows 2-3 x columns 2-3, nothing else.
    row = q2p[5].reshape(8, 8)
    assert (row[2:4, 2:4] == 255).all() and row.sum() == 4 * 255


def test_methods_without_queries_and_side_by_side_share_one_image():
    e = synthetic_explanation()
    g = Explanation(method="gradcam", target_text=e.target_text, output_tokens=e.output_tokens,
                    text_to_patch=torch.rand(5, 64), patch_grid=(8, 8), image=e.image)
    page = explore({"R-GAE": e, "GradCAM": g})
    data = page_data(page.html)[0]
    assert len(data["images"]) == 1  # the same image embedded once
    assert "t2q" in data["panels"][0] and "t2q" not in data["panels"][1]
    assert "No query stage: gradcam" in page.html and ">R-GAE</b>" in page.html and ">GradCAM</b>" in page.html


def test_bad_input_raises_value_error():
    e = synthetic_explanation()
    with pytest.raises(ValueError, match="at least one"):
        explore([])
    with pytest.raises(ValueError, match="expects Explanations"):
        explore([e, "not an explanation"])
    with pytest.raises(ValueError, match="same words"):
        explore([e, synthetic_explanation("a cat on a mat")])
    with pytest.raises(ValueError, match="alpha"):
        explore(e, alpha=1.5)
    with pytest.raises(ValueError, match="display_px"):
        explore(e, display_px=4)


def test_page_is_self_contained_and_escapes_text(tmp_path):
    words = HOSTILE.split()
    e = words_explanation(words, model_name="<b>model</b>", projector_type="mlp2x_gelu",
                          options={"note": "</script><script>alert(1)</script>"}, prompt="<i>prompt</i>")
    page = explore(e, metrics={"pointing": {"<td>": 1.0}})
    text = page.html
    assert "<script>window.__pwned" not in text and "<img src=x" not in text and "<b>model" not in text
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in text and "&lt;b&gt;model&lt;/b&gt;" in text
    assert text.count("<script") == 2 and text.count("</script>") == 2  # the data block and the page's script
    # Nothing that a browser would fetch: no URL scheme other than data:, no external stylesheet or font.
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:|//)", text)
    assert "@import" not in text and "<link" not in text and "url(" not in text
    assert "default-src 'none'" in text
    path = page.save(tmp_path / "sub" / "page.html")
    assert path.read_text(encoding="utf-8") == text
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(ValueError, match="folder"):
        page.save(tmp_path)


def test_page_for_a_336px_photo_with_20_words_stays_under_2mb():
    """The issue's budget: one explanation of a 336 px image with 20 words <= 2 MB, here with a real photo and a dense
    576 x 576 Query-to-Patch map (a Q-Former's; the identity of an MLP compresses to almost nothing)."""
    from skimage import data

    photo = np.asarray(Image.fromarray(data.chelsea()).resize((336, 336), Image.Resampling.BICUBIC))
    words = [f"w{i}" for i in range(20)]
    gen = torch.Generator().manual_seed(0)
    t2q = torch.rand(20, 576, generator=gen) ** 4
    q2p = torch.rand(576, 576, generator=gen)
    e = Explanation(method="rgae", target_text=" ".join(words), output_tokens=words, text_to_patch=t2q @ q2p,
                    patch_grid=(24, 24), text_to_query=t2q, query_to_patch=q2p, query_grid=(24, 24), image=photo,
                    token_probs=torch.rand(20, generator=gen), projector_type="qformer2_576")
    size = len(explore(e))
    assert size <= 2 * 1024 * 1024, f"{size / 2**20:.2f} MiB"


def test_write_site_index_sorted_with_relative_links(tmp_path):
    e = synthetic_explanation()
    records = [("scene/1", [e], {"pointing_game": 0.8, "split": "val"}),
               ("scene 2", {"rgae": e}, {"pointing_game": 0.1}),
               ("Scene-2", e, {}),  # slugs collide with "scene 2" on a case-insensitive file system
               ("<b>4</b>", e, {"pointing_game": float("nan"), "nested": {"hits": 3}}),
               ("numpy", e, {"pointing_game": np.float32(0.3)})]
    index = write_site(iter(records), tmp_path / "site", sort_by="pointing_game")
    text = index.read_text()
    links = re.findall(r'<a href="([^"]+)">([^<]*)</a>', text)
    assert [label for _, label in links] == ["scene 2", "numpy", "scene/1", "Scene-2", "&lt;b&gt;4&lt;/b&gt;"]
    hrefs = [h for h, _ in links]
    assert len(set(h.lower() for h in hrefs)) == 5 and all(not h.startswith(("/", "http")) for h in hrefs)
    for href in hrefs:
        page = (index.parent / href).read_text()
        assert '<a href="../index.html">' in page and "rgae-explore" in page
    assert "nested.hits" in text and "sorted by pointing_game (ascending)" in text
    assert "<b>4</b>" not in text
    down = write_site(records, tmp_path / "site2", sort_by="pointing_game", descending=True).read_text()
    assert [label for _, label in re.findall(r'<a href="([^"]+)">([^<]*)</a>', down)][:3] == ["scene/1", "numpy",
                                                                                            "scene 2"]
    with pytest.raises(ValueError, match="not a metric"):
        write_site(records, tmp_path / "s3", sort_by="accuracy")
    with pytest.raises(ValueError, match="twice"):
        write_site([("a", e, {}), ("a", e, {})], tmp_path / "s4")
    with pytest.raises(ValueError, match="id, explanations, metrics"):
        write_site([("a", e)], tmp_path / "s5")


def test_sections_and_notebook_repr():
    a, b = synthetic_explanation(), synthetic_explanation("a cat on a mat")
    page = explore_sections({"first": a, "second": [b]}, title="two")
    assert page.html.count('class="rgae-explore"') == 2 and "<h1>two</h1>" in page.html
    fragment = a._repr_html_()
    assert fragment.count('class="rgae-explore"') == 1
    assert "<!DOCTYPE" not in fragment and 'data-sync-url="1"' not in fragment  # the notebook's URL is left alone
    broken = synthetic_explanation()
    broken.text_to_patch = torch.full((5, 64), float("nan"))
    assert broken._repr_html_() is None  # a repr never raises


def test_docstring_examples(tmp_path, monkeypatch):
    module = importlib.import_module("rgae.viz.explore")  # rgae.viz.explore the attribute is the function
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ---- a real browser -------------------------------------------------------------------------------------------------
def _chromium() -> str | None:
    return os.environ.get("RGAE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """Headless Chromium over the DevTools protocol on a pipe (``--remote-debugging-pipe``: commands on fd 3, replies
    on fd 4, NUL-separated JSON), with only the standard library: real mouse events, typed console messages and
    exceptions, every network request, and screenshots."""

    def __init__(self, exe: str, width: int = 1700, height: int = 2400):
        self.profile = tempfile.mkdtemp(prefix="rgae-chromium-")
        to_browser, to_us = os.pipe(), os.pipe()
        # Far from 3/4 so that bash can move them there without clobbering one with the other.
        cmd_r, out_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser[0], to_us[1]))
        for fd in (to_browser[0], to_us[1]):
            os.close(fd)
        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                "--disable-extensions", "--mute-audio", f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
                "about:blank"]
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-; exec "$0" "$@"', *args],
            pass_fds=(cmd_r, out_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self.writer = os.fdopen(to_browser[1], "wb", buffering=0)
        self.reader = os.fdopen(to_us[0], "rb", buffering=0)
        self.buffer, self.next_id, self.events = b"", 0, []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Page", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _message(self) -> dict:
        while b"\0" not in self.buffer:
            chunk = self.reader.read(1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        self.writer.write(json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._message()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def call(self, method: str, **params) -> dict:
        return self.send(method, session=self.session, **params)

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str, ready: str = "document.querySelector('.rgae-explore[data-state]')") -> None:
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait(ready)

    def wait(self, condition: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.js(f"!!({condition})"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never satisfied {condition}; console: {self.problems()}")
            time.sleep(0.05)

    def problems(self) -> list[str]:
        """Console errors/warnings, uncaught exceptions and browser-logged errors (CSP violations, failed loads)."""
        out = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "warning", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                out.append(params["exceptionDetails"].get("exception", {}).get("description", "exception"))
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                out.append(params["entry"]["text"])
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def center(self, selector: str) -> tuple[float, float]:
        box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                      " return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        return box[0], box[1]

    def click(self, selector: str, offset: tuple[float, float] | None = None) -> None:
        x, y = self.center(selector) if offset is None else self.corner(selector, offset)
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def hover(self, selector: str) -> None:
        x, y = self.center(selector)
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def corner(self, selector: str, offset: tuple[float, float]) -> tuple[float, float]:
        box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                      " return [r.left, r.top]; })()")
        return box[0] + offset[0], box[1] + offset[1]

    def screenshot(self, selector: str) -> np.ndarray:
        """``uint8 [h, w, 3]`` of the element's box (1 CSS px = 1 pixel)."""
        r = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                    " return [r.left + scrollX, r.top + scrollY, r.width, r.height]; })()")
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": r[0], "y": r[1], "width": r[2], "height": r[3], "scale": 1})
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB"))

    def state(self, n: int = 0) -> dict:
        return json.loads(self.js(f"document.querySelectorAll('.rgae-explore')[{n}].getAttribute('data-state')"))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for f in (self.writer, self.reader):
            f.close()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it); "
                    "set RGAE_CHROMIUM to a Chromium binary elsewhere")
    b = Chromium(exe)
    yield b
    b.close()


@pytest.fixture(scope="module")
def shapes_pages(tmp_path_factory):
    """R-GAE and raw attention on the shipped MLP shapes model, explaining a scene's caption; the page saved."""
    import deco_models
    import rgae
    from deco_models.data.shapes import caption, generate_scene

    model, processor = deco_models.load("shapes-mini-mlp2x_gelu")
    scene = generate_scene(SCENE_SEED, n_objects=3)
    kw = dict(target=caption(scene), prompt="Describe the image.")
    expls = {name: cls(model, processor, model_name="shapes-mini-mlp2x_gelu").attribute(scene.image, **kw)
             for name, cls in (("rgae", rgae.RGAE), ("rawattn", rgae.RawAttention))}
    path = explore(expls).save(tmp_path_factory.mktemp("explore") / "shapes.html")
    return scene, expls, path


def t2i_heat(browser, expl, path: Path, panel: int = 0, view: str = "rx-t2i") -> np.ndarray:
    """The colormap index of every pixel of a panel's overlay, recovered from a screenshot of it."""
    shot = browser.screenshot(f'.rx-panel[data-panel="{panel}"] .{view}').astype(np.float64)
    base = np.repeat(np.repeat(expl.image, 3, axis=0), 3, axis=1).astype(np.float64)  # 96 px shown at 288
    assert shot.shape == base.shape
    data = page_data(path.read_text())[0]
    heat = (shot - (1 - data["alpha"]) * base) / data["alpha"]
    return invert_colormap(heat, data["lut"])


def hot_center(index_map: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(index_map >= index_map.max() - 12)
    return float(xs.mean()), float(ys.mean())


def in_box(point, box, scale: int = 3) -> bool:
    x0, y0, x1, y1 = (v * scale for v in box)
    return x0 <= point[0] < x1 and y0 <= point[1] < y1


def test_browser_page_loads_clean_and_offline(browser, shapes_pages):
    _, expls, path = shapes_pages
    browser.open(path.as_uri())
    assert browser.problems() == []
    assert all(u.startswith(("file:", "data:")) for u in browser.requests()), browser.requests()
    assert browser.state()["word"] is None and browser.state()["shown"][0]["query"] is not None
    assert browser.js("document.querySelectorAll('.rx-panel').length") == 2
    assert browser.js("document.querySelector('.rx-cbar .rx-mode').textContent").startswith("per-map scale")


def test_browser_clicking_a_word_moves_the_hot_spot_into_its_object(browser, shapes_pages):
    scene, expls, path = shapes_pages
    browser.open(path.as_uri())
    rgae_expl = expls["rgae"]
    words = rgae_expl.words
    sentence = hot_center(t2i_heat(browser, rgae_expl, path))
    centers = {}
    for obj, word in zip(scene.objects, LOCALIZED):
        assert word in (obj.color, obj.shape)
        i = words.index(word)
        browser.click(f'.rx-word[data-word="{i}"]')
        browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=1, y=1)  # leave: no hover preview
        assert browser.state()["word"] == i and browser.js("location.hash") == f"#word={i}"
        centers[word] = hot_center(t2i_heat(browser, rgae_expl, path))
        assert in_box(centers[word], obj.box), (word, centers[word], obj.box)
    assert len({(round(x), round(y)) for x, y in [sentence, *centers.values()]}) == 4  # the hot spot moved each time
    # Clicking the selected word again returns to the sentence map.
    browser.click(f'.rx-word[data-word="{words.index(LOCALIZED[-1])}"]')
    assert browser.state()["word"] is None
    assert browser.problems() == []


def test_browser_fragment_opens_a_word_and_screenshot_equals_overlay(browser, shapes_pages):
    scene, expls, path = shapes_pages
    obj = scene.objects[1]
    i = expls["rgae"].words.index(obj.shape)
    browser.open(f"{path.as_uri()}#word={i}&scale=shared")
    state = browser.state()
    assert state["word"] == i and state["shared"] is True
    assert browser.js("document.querySelector('.rx-shared').checked") is True
    assert "shared scale" in browser.js("document.querySelector('.rx-cbar .rx-mode').textContent")
    browser.click(".rx-shared")  # back to per-map: the canvas is then rgae.viz.overlay's picture, pixel for pixel
    assert browser.state()["shared"] is False and browser.js("location.hash") == f"#word={i}"
    shot = browser.screenshot('.rx-panel[data-panel="0"] .rx-t2i').astype(np.int64)
    e = expls["rgae"]
    base = display_image(e)
    reference = overlay(base, selection_map(e, word=i, size=base.shape[:2])).astype(np.int64)
    assert np.array_equal(shot, reference), f"{(shot != reference).mean():.2%} of the values differ"
    assert in_box(hot_center(t2i_heat(browser, e, path)), obj.box)
    assert browser.problems() == []


def test_browser_query_cells_and_hover(browser, shapes_pages):
    _, expls, path = shapes_pages
    browser.open(f"{path.as_uri()}#query=30")
    assert browser.state()["shown"][0]["query"] == 30
    # The MLP's Query-to-Patch map is the identity: query 30 lights exactly patch (2, 6), i.e. pixels 48-71 x 144-167.
    heat = t2i_heat(browser, expls["rgae"], path, view="rx-q2i")
    ys, xs = np.nonzero(heat >= 250)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (48, 71, 144, 167)
    # A real click on the Text-to-Query cell of query 100 (row 8, column 4 of 12 x 12 cells of 16 px).
    browser.click('.rx-panel[data-panel="0"] .rx-t2q', offset=(4 * 16 + 8, 8 * 16 + 8))
    assert browser.state()["query"] == 100 and browser.js("location.hash") == "#query=100"
    # Hovering a word previews its map without selecting it.
    browser.hover('.rx-word[data-word="2"]')
    state = browser.state()
    assert state["word"] is None and state["shown"][0]["word"] == 2
    browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=1, y=1)
    assert browser.state()["shown"][0]["word"] is None
    assert browser.problems() == []


def test_browser_hostile_caption_is_text(browser, tmp_path):
    words = HOSTILE.split()
    e = words_explanation(words, model_name='"><script>window.__pwned=3</script>',
                          options={"x": "</script><script>window.__pwned=4</script>"})
    path = explore(e, title="<script>window.__pwned=5</script>").save(tmp_path / "hostile.html")
    browser.open(path.as_uri())
    assert browser.js("typeof window.__pwned") == "undefined"
    shown = browser.js("[...document.querySelectorAll('.rx-word:not(.rx-sentence)')].map(b => b.textContent)")
    assert shown == words
    assert browser.js("document.querySelector('.rx-title').textContent") == "<script>window.__pwned=5</script>"
    assert all(u.startswith(("file:", "data:")) for u in browser.requests())  # the <img src=x> was never an image
    assert browser.problems() == []


def test_browser_notebook_outputs_are_independent(browser, tmp_path):
    """Two explorers inserted the way a notebook inserts ``_repr_html_`` outputs: both work, neither touches the URL."""
    a, b = synthetic_explanation(), synthetic_explanation("a cat on a mat", seed=3)
    doc = f"<!DOCTYPE html><html><body><div>{a._repr_html_()}</div><div>{b._repr_html_()}</div></body></html>"
    path = tmp_path / "notebook.html"
    path.write_text(doc, encoding="utf-8")
    browser.open(f"{path.as_uri()}#word=1", ready="document.querySelectorAll('.rgae-explore[data-state]').length == 2")
    assert browser.state(0)["word"] is None and browser.state(1)["word"] is None  # the fragment is the notebook's
    browser.click('body > div:first-child .rx-word[data-word="3"]')
    browser.js("document.querySelectorAll('.rgae-explore')[1].querySelector('.rx-word[data-word=\"2\"]').click()")
    assert browser.state(0)["word"] == 3 and browser.state(1)["word"] == 2
    assert browser.js("location.hash") == "#word=1"
    assert browser.problems() == []


def test_browser_sections_address_each_explorer(browser, tmp_path):
    page = explore_sections({"one": synthetic_explanation(), "two": synthetic_explanation("a cat on a mat")})
    path = page.save(tmp_path / "sections.html")
    browser.open(f"{path.as_uri()}#word=1&1.word=3",
                 ready="document.querySelectorAll('.rgae-explore[data-state]').length == 2")
    assert browser.state(0)["word"] == 1 and browser.state(1)["word"] == 3
    browser.js("document.querySelectorAll('.rgae-explore')[0].querySelector('.rx-word[data-word=\"4\"]').click()")
    assert browser.js("location.hash") == "#word=1&1.word=3&0.word=4"
    assert browser.problems() == []


# ---- command lines --------------------------------------------------------------------------------------------------
def test_cli_explain_writes_the_page(tmp_path, capsys):
    from deco_models.data.shapes import caption, generate_scene
    from rgae.cli import main

    scene = generate_scene(SCENE_SEED, n_objects=3)
    Image.fromarray(scene.image).save(tmp_path / "scene.png")
    args = ["explain", "--model", "shapes-mini-mlp2x_gelu", "--image", str(tmp_path / "scene.png"), "--text",
            caption(scene), "--out", str(tmp_path / "e"), "--device", "cpu"]
    assert main([*args, "--html", str(tmp_path / "page.html")]) == 0
    assert "interactive page written to" in capsys.readouterr().out
    data = page_data((tmp_path / "page.html").read_text())
    assert len(data) == 1 and len(data[0]["panels"][0]["t2i"]["png"]) == 1 + len(caption(scene).split())
    (tmp_path / "folder").mkdir()
    assert main([*args, "--html", str(tmp_path / "folder")]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_demo_index_page_holds_every_model_and_method(tmp_path):
    from rgae.commands import demo

    scene = synthetic_explanation("a large yellow square")
    explained = {name: {"shapes": {"rgae": scene, "gradcam": synthetic_explanation(scene.target_text, seed=1)},
                        "photo": {"rgae": synthetic_explanation(answer), "rawattn": synthetic_explanation(answer)}}
                 for name, answer in (("shapes-mini-mlp2x_gelu", "a red circle"), ("tiny-x", "a blue square"))}
    demo._write_explorer(tmp_path, explained)
    text = (tmp_path / "index.html").read_text()
    data = page_data(text)
    assert [len(d["panels"]) for d in data] == [4, 2, 2]  # one shared-selection scene section, a photo per model
    assert ">mlp2x_gelu · gradcam</b>" in text and "tiny-x&#x27;s own answer" in text


def test_tiled_layout_maps_cover_every_view_and_queries_draw_over_their_own_view(browser, tmp_path):
    """A base view of the whole 32×32 image and a tile of its right half: the Text-to-Image data is the layout's
    rendering over both views (the tile's relevance lands in the right half only), and a query of the tile draws its
    Query-to-Patch row inside the tile's box, nothing outside it."""
    base_view, tile = View("base", (2, 2), (0, 0, 32, 32)), View("tile 0,1", (2, 2), (16, 0, 32, 32))
    layout = ImageLayout((32, 32), (base_view, tile), torch.arange(8), query_to_patch=torch.eye(8), rule="identity")
    t2p = torch.zeros(2, 8)
    t2p[:, 4 + 1] = 1.0  # tile patch (0, 1): the top right quarter of the image
    q2p = torch.eye(8)
    e = Explanation(method="rgae", target_text="a cat", output_tokens=["a", "cat"], text_to_patch=t2p,
                    text_to_query=t2p.clone(), query_to_patch=q2p, layout=layout,
                    image=np.full((32, 32, 3), 128, np.uint8))
    data = page_data(explore(e, display_px=64).html)[0]
    panel = data["panels"][0]
    assert panel["views"] == [[0, 0, 64, 64, 2, 2, 0], [32, 0, 64, 64, 2, 2, 4]]
    assert panel["q2p"]["view"] == [0, 0, 0, 0, 1, 1, 1, 1]
    sentence = decode_png(panel["t2i"]["png"][0]).astype(float)
    assert sentence[:, :32].max() == 0 and sentence[:32, 32:].mean() > sentence[32:, 32:].mean()
    m = selection_map(e, size=(64, 64))
    assert m.shape == (64, 64) and np.isfinite(m).all()
    assert panel["t2i"]["hi"][0] == pytest.approx(float(m.max()), rel=1e-5)
    path = explore(e, display_px=64).save(tmp_path / "tiled.html")
    browser.open(f"{path.as_uri()}#query=5")  # tile patch (0, 1)
    assert browser.state()["shown"][0]["query"] == 5
    shot = browser.screenshot('.rx-panel[data-panel="0"] .rx-q2i').astype(np.int64)
    outside, hot, cold = shot[:, :32], shot[:32, 48:], shot[32:, 32:]
    assert (outside == outside[0, 0]).all()  # outside the tile's box: the scale's bottom everywhere
    assert not np.array_equal(hot[0, 0], cold[0, 0]) and (hot == hot[0, 0]).all()
    assert browser.problems() == []
