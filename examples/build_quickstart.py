"""Write ``examples/quickstart.ipynb`` (unexecuted) from the cells below with nbformat.

Run ``python examples/build_quickstart.py`` after editing a cell; tests/test_notebook.py executes the notebook.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """# rgae quickstart

Where does a LLaVA-style model look when it says a word? This notebook loads a model, explains a caption with
**R-GAE**, compares it with the baselines (raw attention, attention rollout, GradCAM) in an interactive explorer,
checks the maps against ground truth, and saves the figures. It runs offline on CPU in well under a minute."""),
    ("code", """%matplotlib inline
import warnings
from pathlib import Path

from IPython.display import display

import rgae
from deco_models import zoo
from deco_models.data.shapes import caption, generate_scene
from rgae import metrics, viz

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notice when ipywidgets is missing"""),
    ("md", """## 1. Load a model

The shapes-mini models ship with `deco_models` (`zoo.available()`) and differ only in the projector: `mlp2x_gelu`
keeps all 144 patches, `avgpool2_36` (DeCo) pools them to 36, `qformer2_36` resamples them with 36 learned queries.
If none is installed (train them with `deco train --recipe shapes-mini`), the notebook falls back to a **tiny random
model**: everything runs, but its maps mean nothing."""),
    ("code", """names = zoo.available()
print("installed models:", names or "none")
if names:
    MODEL = "shapes-mini-mlp2x_gelu" if "shapes-mini-mlp2x_gelu" in names else names[0]
    model, processor = zoo.load(MODEL)
else:
    from rgae.commands.demo import tiny_random_model

    MODEL = "tiny-mlp2x_gelu"
    model, processor = tiny_random_model("mlp2x_gelu")
    print("!!! The zoo is empty: using a TINY RANDOM MODEL. The maps below are meaningless. !!!")
config = model.config
print("model:", MODEL, "| projector:", config.projector_type, "| image tokens:", config.num_image_tokens)"""),
    ("md", """## 2. Explain a caption

A shapes scene with exact ground truth. We teacher-force its caption and ask R-GAE which patches each word drew on.
`attribute` returns an `Explanation`: raw (unnormalized) `text_to_patch [T, N]` maps, the Text-to-Query and
Query-to-Patch stages, and everything needed to reproduce the forward pass."""),
    ("code", """scene = generate_scene(2, n_objects=3)
text = caption(scene)
expl = rgae.RGAE(model, processor, model_name=MODEL).attribute(scene.image, target=text, prompt="Describe the image.")
print(expl)
print("words:", expl.words)
print("teacher-forced token probabilities:", [round(float(p), 2) for p in expl.token_probs])"""),
    ("code", """display(expl.plot("decomposition"))  # R_t2i | R_t2q | R_q2i: the paper's Figure 3 row"""),
    ("code", """display(viz.plot_words(expl))  # one map per word"""),
    ("md", """## 3. Compare methods

Same image, same target, four methods. Rows are methods, columns the sentence map and the content words."""),
    ("code", """methods = {"rgae": rgae.RGAE, "rawattn": rgae.RawAttention, "rollout": rgae.AttentionRollout,
           "gradcam": rgae.GradCAM}
expls = {name: cls(model, processor).attribute(scene.image, target=text, prompt="Describe the image.")
         for name, cls in methods.items()}
content = [i for i, w in enumerate(expl.words) if w in ("yellow", "square", "blue", "circle", "red", "triangle")]
display(viz.plot_comparison(expls, words=[None, *content]))"""),
    ("md", """## 4. Explore interactively

`viz.explore` builds a self-contained page (no server, no network): hover or click a word to see its Text-to-Image
map, click a Text-to-Query cell for that query's Query-to-Image map, switch between per-map and shared colour scales.
The methods sit side by side and share the selection. Displaying an `Explanation` on its own shows the same explorer;
`.save("page.html")` writes a file that opens anywhere, at a selection with `page.html#word=2`."""),
    ("code", """page = viz.explore(expls)
page.save("quickstart-explorer.html")
page"""),
    ("md", """## 5. Check the maps against ground truth

Pointing game: does the top patch of a word's map fall inside its object's box? Every color and shape word of this
scene names a unique object. `projector_diagnostics` measures the projector's Query-to-Patch map: locality (mass in
the best window) and redundancy between queries."""),
    ("code", """from rgae.commands.demo import unique_word_boxes

for name, e in expls.items():
    hits = [metrics.word_pointing_game(e, i, box, original_hw=scene.image.shape[:2])
            for i, _, box in unique_word_boxes(e, scene)]
    print(f"{name:8s} pointing game {sum(hits)}/{len(hits)}")
hw = expl.image.shape[:2]
chance = [metrics.random_pointing_baseline(box, expl.patch_grid, hw) for _, _, box in unique_word_boxes(expl, scene)]
print(f"random   expected {sum(chance):.2f}/{len(chance)}")
d = metrics.projector_diagnostics(expl)
print({k: round(v, 3) for k, v in d.items() if not k.startswith("per_query")})"""),
    ("md", """## 6. A real photo

`skimage.data.chelsea()` explained with the model's own answer (`target=None`). A shapes model has never seen a cat:
expect it to describe colors and shapes."""),
    ("code", """from rgae.commands.demo import demo_photo

photo = demo_photo()
try:
    photo_expl = rgae.RGAE(model, processor).attribute(photo, prompt="Describe the image.", max_new_tokens=12)
except ValueError:  # a tiny random model may answer nothing at all
    photo_expl = rgae.RGAE(model, processor).attribute(photo, target="a yellow circle", prompt="Describe the image.")
print("answer:", photo_expl.target_text)
display(photo_expl.plot("decomposition"))"""),
    ("md", """## 7. A Qwen2-VL-style model

Qwen2-VL sees each image at its own resolution: the processor resizes it to multiples of 28 px (`image_grid_thw`),
the vision tower attends per image inside one packed sequence, and its merger concatenates every 2×2 block of
patches into one LLM token. rgae maps each token back to its block and each patch to its box in the original photo
(`docs/adapters.md`). Here a tiny **random** `Qwen2VLForConditionalGeneration` with the shapes words: the layout is
real, the maps mean nothing. (Qwen's processors need torchvision for their video part; `image_text_processor` builds
one without it.)"""),
    ("code", """from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

from deco_models.recipes.shapes_mini import build_tokenizer
from rgae.adapters.qwen_vl_base import image_text_processor

tokenizer = build_tokenizer()  # the shapes words and "<image>", plus Qwen's vision delimiters
tokenizer.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]})
chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\\n{% for c in m['content'] %}"
          "{% if c['type'] == 'image' %}<|vision_start|><image><|vision_end|>{% else %}{{ c['text'] }}"
          "{% endif %}{% endfor %}<|im_end|>\\n{% endfor %}<|im_start|>assistant\\n")
qwen_processor = image_text_processor(Qwen2VLProcessor, Qwen2VLImageProcessorPil(max_pixels=28 * 28 * 96), tokenizer,
                                      chatml)
ids = tokenizer.convert_tokens_to_ids
qwen = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
    vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14),
    text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=len(tokenizer), bos_token_id=None,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [8, 4, 4]}),
    image_token_id=ids("<image>"), video_token_id=ids("<|video_pad|>"),
    vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))).eval()
qwen_expl = rgae.RGAE(qwen, qwen_processor).attribute(photo, target="a yellow circle", prompt="Describe the image.")
print("photo", photo.shape[:2], "-> patches", qwen_expl.layout.views[0].grid, "-> tokens",
      qwen_expl.layout.query_grid, "| Query-to-Patch:", qwen_expl.options["query_to_patch_rule"])
display(qwen_expl.plot("decomposition"))"""),
    ("md", """## 8. Save figures

`save_figures` writes the original tool's file names (`R_t_i-…`, `R_t_q-…`, `R_q_i-…`, `decomposition-…`) in PNG,
PDF or SVG; `Explanation.save` keeps the raw maps (safetensors + JSON) for later."""),
    ("code", """out = Path("quickstart-figures")
paths = viz.save_figures(expl, out, formats=("png",), words=False)
expl.save(out / "explanation")
print(len(paths), "figures in", out.resolve())
for p in sorted(paths):
    print(" ", p.name)"""),
]


def build() -> nbformat.NotebookNode:
    cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


if __name__ == "__main__":
    path = Path(__file__).with_name("quickstart.ipynb")
    nbformat.write(build(), str(path))
    print(f"wrote {path}")
