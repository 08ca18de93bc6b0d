"""PaliGemma: its processor's own prompt format (image tokens before <bos>), the bidirectional prefix with the
teacher-forced target as causal suffix (token_type_ids = 1), identity Query-to-Patch; R-GAE against the full-matrix
oracle, end to end, planted region. Tiny real models (tests/families/tiny_paligemma.py)."""

from __future__ import annotations

import pytest
import torch

from rgae import RGAE
from rgae.viz import save_figures
from tests.families import layout_probes as probes
from tests.families.tiny_paligemma import IMAGE, tiny_paligemma, tiny_paligemma_processor
from tests.family_checks import assert_close_relative, full_matrix_text_to_query

# transformers' PaliGemmaProcessor builds its BC `labels` with np.array() on the torch tensors it just made; numpy 2
# warns (DeprecationWarning, attributed to transformers) that torch's Tensor.__array__ takes no `copy` argument. Not a
# deprecation of anything this project calls, so strict CI runs must not fail on it.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

IMAGE_HW = (48, 80)


def noise(hw=IMAGE_HW, seed=0):
    return probes.noise_image(hw, seed)


@pytest.fixture(scope="module")
def model64():
    return tiny_paligemma(dtype=torch.float64)


@pytest.fixture(scope="module")
def explainer(model64):
    return RGAE(model64, tiny_paligemma_processor())


def test_prompt_and_layout_follow_the_processors_format(explainer):
    inputs = explainer.prepare(noise(), "a red circle", "caption en")
    tokens = explainer.processor.tokenizer.convert_ids_to_tokens(inputs.input_ids[0].tolist())
    assert tokens == ["<image>"] * 16 + ["<bos>", "caption", "en", "\n", "a", "red", "circle"]
    assert inputs.prompt == "<image>caption en"  # the adapter's prompt_template; the processor adds <bos> and "\n"
    layout = inputs.layout
    assert layout.positions.tolist() == list(range(16)) and layout.rule == "identity"
    assert layout.views[0].box == (0.0, 0.0, 80.0, 48.0)
    # The prompt is the bidirectional prefix (0); the target is the causal suffix (1), as the processor's suffix is.
    assert inputs.model_kwargs()["token_type_ids"][0].tolist() == [0] * 20 + [1] * 3


def test_teacher_forced_logits_do_not_see_the_target(explainer, model64):
    # With the target in the prefix (token type 0) the prompt's positions would attend to the target's tokens.
    logits = []
    for target in ("a red circle", "a blue square"):
        inputs = explainer.prepare(noise(), target, "caption en")
        with torch.no_grad():
            logits.append(model64(**inputs.model_kwargs()).logits[0, inputs.prompt_len - 1: inputs.prompt_len + 1])
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    batch = explainer.processor(images=noise(), text="<image>caption en", return_tensors="pt")
    with torch.no_grad():
        alone = model64(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, -1]
    torch.testing.assert_close(logits[0][0], alone.double(), rtol=1e-12, atol=1e-12)


def test_text_to_query_equals_the_full_matrix_oracle_and_text_to_patch_composes(explainer, model64):
    inputs = explainer.prepare(noise(), "a red circle", None)
    out = explainer.compute(inputs)
    assert_close_relative(out["text_to_query"], full_matrix_text_to_query(model64, inputs), 1e-6)
    torch.testing.assert_close(out["text_to_patch"], out["text_to_query"], rtol=0, atol=0)  # identity Q2P


def test_a_pixel_reaches_exactly_its_patch(explainer):
    assert len(probes.check_pixel_reaches_its_patches(explainer, noise(), (IMAGE, IMAGE))) == 1


@pytest.mark.parametrize("patch", [0, 6, 15])
def test_a_connector_patch_reaches_exactly_its_token(explainer, patch):
    assert probes.check_patch_reaches_its_tokens(explainer, noise(), patch, linear=True) == [patch]


def test_end_to_end_teacher_forced_generated_and_through_vision(explainer):
    e = explainer.attribute(noise(), target="a red circle")
    assert e.patch_grid == (4, 4) and e.image_map().shape == IMAGE_HW and e.image_map(word="red").shape == IMAGE_HW
    g = explainer.attribute(noise(), target=None, max_new_tokens=3)
    assert g.text_to_query.shape[1] == 16 and g.image_map().shape == IMAGE_HW
    v = explainer.attribute(noise(), target="a red circle", through_vision=True)
    assert v.text_to_patch.shape == (3, 16) and not torch.equal(v.text_to_patch, e.text_to_patch)


@pytest.mark.slow
def test_figures_are_written(explainer, tmp_path):
    e = explainer.attribute(noise(), target="a red circle")
    paths = save_figures(e, tmp_path, dpi=30, words=False)
    assert paths and all(p.stat().st_size > 0 for p in paths)


def test_planted_region_lights_up_in_the_image_map():
    model = tiny_paligemma(dtype=torch.float64, text_layers=1, seed=1)
    explainer = RGAE(model, tiny_paligemma_processor(image_mean=[0.0] * 3, image_std=[1.0] * 3))
    probes.plant(model, explainer.adapter)
    region = (8, 16, 16, 24)  # patch (2, 1) of a 32×32 image with 8-px patches
    dark, bright = probes.bright_square(IMAGE, IMAGE, region)
    e = explainer.attribute(bright, target=probes.planted_target(explainer, dark, bright))
    assert torch.nonzero(e.text_to_query[0]).flatten().tolist() == [9]
    assert probes.pointing_in(e.image_map(), region)


def test_docstring_examples():
    import rgae.adapters.paligemma as module
    import tests.families.tiny_paligemma as tiny

    probes.run_doctests(module, tiny)
