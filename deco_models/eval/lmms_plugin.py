"""lmms-eval model plugin: run lmms-eval's benchmark suite on deco models.

Registration: lmms-eval (checked against 0.7.3) reads the entry-point group ``lmms_eval.models`` in
``lmms_eval.models.registry_v2.ModelRegistryV2.load_entrypoint_manifests``; each entry point loads to a
``ModelManifest`` or a callable returning one. This package declares::

    [project.entry-points."lmms_eval.models"]
    deco = "deco_models.eval.lmms_plugin:lmms_eval_manifest"

(a function, not the class: lmms-eval *calls* a callable payload, which would instantiate the model). Then::

    pip install "rgae[lmms]"
    lmms-eval --model deco --model_args pretrained=checkpoints/deco-avgpool,batch_size=8 --tasks pope,gqa

lmms-eval is optional and heavy (it pulls torchvision, which this project avoids): it is imported only when this
module is imported, which lmms-eval itself does; ``import deco_models.eval`` never imports it. Without lmms-eval the
class still works on ``Instance``-like objects (anything with an ``args`` tuple), on a minimal stand-in base.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lmms_eval.models"
ENTRY_POINT = "deco_models.eval.lmms_plugin:lmms_eval_manifest"
MODEL_ID = "deco"

try:  # pragma: no cover - depends on the optional extra
    from lmms_eval.api.model import lmms as _LMMSBase

    HAVE_LMMS_EVAL = True
except ImportError:
    HAVE_LMMS_EVAL = False

    class _LMMSBase:
        """Stand-in for ``lmms_eval.api.model.lmms`` when lmms-eval is not installed (single process)."""

        is_simple = True

        def __init__(self) -> None:
            self._rank = 0
            self._world_size = 1
            self.task_dict: dict = {}
            self.cache_hook = None

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size


def lmms_eval_manifest():
    """The entry-point payload: lmms-eval's ``ModelManifest`` for :class:`DecoLMMS` under the name ``deco``.

    Example (with lmms-eval installed)::

        >>> lmms_eval_manifest().simple_class_path  # doctest: +SKIP
        'deco_models.eval.lmms_plugin.DecoLMMS'
    """
    try:
        from lmms_eval.models.registry_v2 import ModelManifest
    except ImportError as exc:
        raise ImportError(
            f"lmms-eval with entry-point model registration (lmms_eval.models.registry_v2) is needed: {exc}"
        ) from exc
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.DecoLMMS", aliases=("deco_models",))


def _flatten(visuals) -> list:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    out = []
    for v in visuals:
        out.extend(_flatten(v))
    return out


class DecoLMMS(_LMMSBase):
    """A deco model (or any LLaVA-style model + processor) behind lmms-eval's simple-model API.

    ``pretrained`` is a path for :func:`deco_models.load`; tests and scripts may pass ``model=``/``processor=``
    objects instead. Generation is greedy (``temperature`` > 0 in a task's generation kwargs is ignored with a
    warning); ``until`` strings cut the answer. ``loglikelihood`` returns the *sum* of the continuation's token
    log-probabilities and whether greedy decoding would produce it.

    Example::

        lm = DecoLMMS(pretrained="checkpoints/deco-avgpool", device="cuda", batch_size=8)
        lm.task_dict = {"pope": {"test": docs}}
        lm.generate_until([instance, ...])
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int | str = 128,
        template: str | None = None,
        image_aspect: str | None = None,
        model=None,
        processor=None,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"unexpected model_args for deco: {sorted(kwargs)}")
        import torch

        if model is None or processor is None:
            if pretrained is None:
                raise ValueError("pass pretrained=<checkpoint dir> (or model= and processor= objects)")
            from deco_models import load

            model, processor = load(pretrained)
        if image_aspect not in (None, "pad", "square"):
            raise ValueError(
                f"image_aspect must be 'pad' or 'square' (or unset: the processor's), got {image_aspect!r}"
            )
        if image_aspect is not None and hasattr(processor, "image_aspect"):
            processor.image_aspect = image_aspect
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._model = model.to(device).eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.template = template
        self.pad_to_square = None if image_aspect is None else image_aspect == "pad"

    @property
    def model(self):
        return self._model

    # -- helpers -------------------------------------------------------------------------------------------------
    def _doc_visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        from deco_models.eval.generation import pad_for_processor

        images = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
        return [pad_for_processor(img.convert("RGB"), self.processor, self.pad_to_square) for img in images]

    def _prompt(self, context: str, n_images: int) -> str:
        from deco_models.eval.generation import IMAGE_PLACEHOLDER, render_prompt

        if n_images and IMAGE_PLACEHOLDER not in context:
            context = "\n".join([IMAGE_PLACEHOLDER] * n_images) + "\n" + context
        return render_prompt(context, self.template, with_image=False, processor=self.processor)

    # -- lmms API ------------------------------------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        from tqdm.auto import tqdm

        from deco_models.eval.generation import generate_batch

        results: list[str | None] = [None] * len(requests)
        # Requests with the same generation settings and the same image count can share a batch.
        groups: dict = {}
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            if float(gen_kwargs.get("temperature", 0) or 0) > 0:
                logger.warning("deco: temperature %s ignored, decoding greedily", gen_kwargs["temperature"])
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))
            images = self._doc_visuals(doc_to_visual, doc_id, task, split)
            key = (max_new, len(images) > 0)
            groups.setdefault(key, []).append((index, self._prompt(context, len(images)), images, until))
        bar = tqdm(total=len(requests), desc="deco generate_until", disable=self.rank != 0)
        for (max_new, _), items in groups.items():
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                images = [img for _, _, imgs, _ in chunk for img in imgs]
                texts = generate_batch(
                    self.model, self.processor, [p for _, p, _, _ in chunk], images or None, max_new_tokens=max_new
                )
                for (index, _, _, until), text in zip(chunk, texts):
                    for stop in until:
                        if stop and stop in text:
                            text = text.split(stop)[0]
                    results[index] = text.strip()
                bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        import torch

        results = []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict.get(task, {}).get(split, {}).get(doc_id) if self.task_dict else None
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            images = self._doc_visuals(doc_to_visual, doc_id, task, split)
            prompt = self._prompt(context, len(images))
            if images:
                inputs = self.processor(images=images, text=[prompt], return_tensors="pt")
            else:
                inputs = self.processor(text=[prompt], return_tensors="pt")
            # Continuation tokens are appended as ids (not re-tokenized with the prompt) so the boundary is exact.
            cont_ids = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
            if cont_ids.shape[1] == 0:
                raise ValueError(f"empty continuation for doc {doc_id!r} of task {task!r}")
            input_ids = torch.cat([inputs["input_ids"], cont_ids], dim=1)
            model_inputs = dict(inputs)
            model_inputs["input_ids"] = input_ids
            model_inputs["attention_mask"] = torch.ones_like(input_ids)
            model_inputs = {k: v.to(self.model.device) for k, v in model_inputs.items()}
            if "pixel_values" in model_inputs:
                model_inputs["pixel_values"] = model_inputs["pixel_values"].to(self.model.dtype)
            with torch.inference_mode():
                logits = self.model(**model_inputs).logits[0].float()
            n_cont = cont_ids.shape[1]
            # Position t predicts token t+1: the continuation is predicted by the n_cont positions before its end.
            pred_logits = logits[-n_cont - 1 : -1]
            targets = input_ids[0, -n_cont:].to(pred_logits.device)
            logprobs = torch.log_softmax(pred_logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
            is_greedy = bool((pred_logits.argmax(dim=-1) == targets).all())
            results.append((float(logprobs.sum()), is_greedy))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("deco models answer single-round requests only (generate_until)")
