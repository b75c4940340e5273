"""``LazyAttnVLM``: a VLMEvalKit model built on the harness's model loading and a ``lazyattn`` method.

From Python, with VLMEvalKit's own inference job (in ``.venv-vlmeval``)::

    from harness.vlmeval import import_vlmeval; import_vlmeval()
    from vlmeval.dataset import build_dataset
    from vlmeval.inference import infer_data_job
    from harness.vlmeval.model import LazyAttnVLM

    model = LazyAttnVLM(model="llava15_7b", method="lazy", **{"model.path": "/data/llava-1.5-7b-hf"})
    infer_data_job(model, work_dir="outputs/vlmeval", model_name="llava15_lazy", dataset=build_dataset("POPE"))

or registered under a name for ``vlmeval.config.supported_VLM`` (``register("lazyattn", ...)``).
``model`` and ``method`` name ``conf/`` presets and take any Hydra override of either group as
keyword arguments, exactly as ``python -m harness`` composes them; the harness hands in the model
it already loaded (``from_loaded``).

A message (VLMEvalKit's ``[{type: image|text, value}, ...]``) becomes one user turn: its images
first, then its texts joined by newlines, as LLaVA's and the harness's own prompts put them; the
answer is greedy, through the harness's generator (``harness.generate.answer``, the call every
path answers with), with the given budget. ``answer_ahead`` answers many messages in batches
(equal image-token counts together) and keeps the answers, so VLMEvalKit's one-message-at-a-time loop receives them: that is
how the ``task=vlmeval`` route batches. Each answer's KV cache bytes are kept (``kv_bytes``).

For the exported shapes sets (``harness.vlmeval.export_shapes``) the model builds the prompt
itself (``use_custom_prompt``): the image and the question as the harness asks it, without the
option list VLMEvalKit's multiple-choice prompt adds, so both backends ask the same thing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from PIL import Image

from harness.method import fixed_method
from harness.command_line import check_overrides
from harness.config import compose
from harness.settings import resolve_device
from harness.generate import Conversation, answer
from harness.models import Loaded, load_model
from harness.vlmeval import import_vlmeval
from lazyattn import Method

import_vlmeval()
from vlmeval.smp import toliststr  # noqa: E402
from vlmeval.vlm.base import BaseModel  # noqa: E402

DEFAULT_MAX_NEW_TOKENS = 32
SHAPES_PREFIX = "shapes_"  # the exported shapes sets: shapes_yorn, shapes_mcq (and any --name shapes_*)


def message_key(message: Sequence[dict]) -> str:
    return json.dumps([[m["type"], str(m["value"])] for m in message])


def to_history(message: Sequence[dict]) -> tuple[list[dict], list[Image.Image]]:
    """A VLMEvalKit message -> one user turn (images first, then the texts) and its images."""
    images, texts = [], []
    for item in message:
        if item["type"] == "image":
            images.append(Image.open(item["value"]).convert("RGB"))
        elif item["type"] == "text":
            texts.append(str(item["value"]))
        else:
            raise NotImplementedError(f"the lazyattn VLMEvalKit model takes images and text, not {item['type']!r}.")
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "\n".join(texts)}]
    return [{"role": "user", "content": content}], images


class LazyAttnVLM(BaseModel):
    """A harness-loaded model with a ``lazyattn`` method (dense too), greedy answers."""

    INTERLEAVE = False
    allowed_types = ["text", "image"]

    def __init__(self, model: str = "llava_tiny", method: str = "dense", device: str | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 1, cache: str = "static",
                 **overrides) -> None:
        bad = [k for k in overrides if not k.startswith(("model.", "method."))]
        if bad:
            raise ValueError(f"unknown LazyAttnVLM settings {bad}; use model=, method=, model.<key>=, method.<key>=, "
                             "device=, max_new_tokens=, batch_size=, cache=.")
        args = [f"model={model}", f"method={method}", *(f"{k}={v}" for k, v in overrides.items())]
        check_overrides(args)  # an unknown preset or key: one line naming it
        cfg = compose(args)
        built = fixed_method(cfg.method, "the lazyattn VLMEvalKit model")
        device = resolve_device(str(device or "auto"))
        self._init(load_model(cfg.model, device), built, device, max_new_tokens, batch_size, cache)

    @classmethod
    def from_loaded(cls, loaded: Loaded, method: Method, device, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                    batch_size: int = 1, cache: str = "static") -> LazyAttnVLM:
        """Wrap a model the caller already loaded (the harness's ``task=vlmeval``)."""
        self = cls.__new__(cls)
        self._init(loaded, method, torch.device(device), max_new_tokens, batch_size, cache)
        return self

    def _init(self, loaded, method, device, max_new_tokens, batch_size, cache) -> None:
        BaseModel.__init__(self)
        if int(max_new_tokens) < 1 or int(batch_size) < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}.")
        self.loaded, self.method, self.device = loaded, method, torch.device(device)
        self.model = loaded.model.to(self.device)
        self.max_new_tokens, self.batch_size, self.cache = int(max_new_tokens), int(batch_size), cache
        self.answers: dict[str, str] = {}  # message key -> answer (answer_ahead, generate_inner)
        self.kv_bytes: dict[str, int] = {}  # message key -> the answer's KV cache bytes
        self.first_prompt: tuple[list[dict], list[Image.Image]] | None = None

    # VLMEvalKit's prompt hooks: the shapes sets ask what the harness asks
    def use_custom_prompt(self, dataset: str) -> bool:
        return str(dataset).startswith(SHAPES_PREFIX)

    def build_prompt(self, line, dataset=None) -> list[dict]:
        paths = toliststr(self.dump_image(line, dataset))
        return [*(dict(type="image", value=p) for p in paths), dict(type="text", value=str(line["question"]))]

    def answer_ahead(self, messages: Sequence[list[dict]], budget: int | None = None) -> None:
        """Answer every message not answered yet, ``batch_size`` at a time (those with equal
        image-token counts together, ``harness.generate.answer``); the answers wait for ``generate``."""
        todo = {message_key(m): m for m in messages if message_key(m) not in self.answers}
        budget = int(budget or self.max_new_tokens)

        def conversations():  # images opened as the generator reaches them
            for key, message in todo.items():
                conv = Conversation(key, *to_history(message), [budget])
                if self.first_prompt is None:
                    self.first_prompt = (conv.history, conv.images)
                yield conv

        with self.method.apply(self.model):
            for ans in answer(self.model, self.loaded.processor, conversations(), self.batch_size, self.device,
                              cache=self.cache):
                self.answers[ans.id], self.kv_bytes[ans.id] = ans.prediction, int(ans.kv_bytes[-1])

    def generate_inner(self, message, dataset=None) -> str:
        key = message_key(message)
        if key not in self.answers:
            self.answer_ahead([message])
        return self.answers[key]


def register(name: str = "lazyattn", **settings) -> None:
    """Make ``LazyAttnVLM(**settings)`` VLMEvalKit's model ``name`` (``vlmeval.config.supported_VLM``)."""
    from functools import partial

    from vlmeval.config import supported_VLM

    supported_VLM[name] = partial(LazyAttnVLM, **settings)
