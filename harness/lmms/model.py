"""The ``lazyattn`` model for lmms-eval 0.7 (chat-style API): harness model loading plus a method.

From the command line (registered through the ``lmms_eval.models`` entry point)::

    python -m lmms_eval --model lazyattn \\
        --model_args model=llava_tiny,method=lazy,method.ratio=0.5 \\
        --tasks lazyattn_shapes --include_path harness/lmms/tasks --batch_size 4

``model_args``: ``model=<conf/model preset>`` and ``method=<conf/method preset>`` plus any Hydra
override of either group (``model.path=/data/llava-1.5-7b-hf``, ``method.layers=[2,4,6]``,
``method.ratio=0.7``), and ``device``, ``batch_size``, ``max_new_tokens`` (used when a task gives
none). The harness builds the model and the method exactly as ``python -m harness`` does; the
harness itself hands in the objects it already holds (``LazyAttnLMM.from_loaded``).

Generation is greedy and batched (left padding), through ``harness.generate.answer``, the call
the built-in path uses (requests with equal image-token counts batched together, answers in
request order). Sampling settings in a task's ``generation_kwargs``
(temperature, top_p, num_beams) are ignored with a warning; ``until`` stop strings are applied
to the decoded text. ``loglikelihood`` and multi-round generation are not implemented.

Data parallel: under ``accelerate launch --num_processes N -m lmms_eval ...`` (or ``torchrun``;
on CPU ``ACCELERATE_USE_CPU=true torchrun ...``) every process loads one replica on its own
device and lmms-eval shards the documents by rank and gathers the results (``_data_parallel``).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

import torch
from lmms_eval.api.model import lmms
from PIL import Image

from harness.method import fixed_method
from harness.command_line import check_overrides
from harness.config import compose
from harness.settings import RunError, resolve_device
from harness.generate import Conversation, answer
from harness.models import Loaded, load_model
from lazyattn import Method

DEFAULT_MAX_NEW_TOKENS = 128
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "num_beams", "do_sample")


def _override(key: str, value) -> str:
    if isinstance(value, bool):
        value = str(value).lower()
    return f"{key}={value}"


def _cut(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _as_image(url) -> Image.Image:
    if isinstance(url, Image.Image):
        return url.convert("RGB")
    if isinstance(url, str):
        return Image.open(url).convert("RGB")
    raise TypeError(f"the lazyattn model takes PIL images or image paths, got {type(url).__name__}.")


def to_history(messages: list[dict]) -> tuple[list[dict], list[Image.Image]]:
    """lmms-eval chat messages -> the harness's chat history (image placeholders) and its images."""
    history, images = [], []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = []
        for part in content:
            kind = part["type"]
            if kind == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                parts.append({"type": "image"})
                images.append(_as_image(part["url"]))
            else:
                raise NotImplementedError(f"the lazyattn model takes text and images only, not {kind!r}.")
        history.append({"role": message["role"], "content": parts})
    return history, images


def _data_parallel(device: str | None):
    """``(accelerator, device)`` for this process: one replica per rank under ``accelerate launch`` / ``torchrun``.

    lmms-eval shards the requests by ``RANK``/``WORLD_SIZE`` and gathers the results itself; the
    model only has to sit on its own rank's device and expose ``accelerator``, ``rank`` and
    ``world_size``. Single process: ``(None, device)``. No DDP wrapper: nothing is trained.
    """
    name = str(device or "auto")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, resolve_device(name)
    from accelerate import Accelerator

    on_cpu = name == "cpu" or not torch.cuda.is_available()
    if not on_cpu and name not in ("auto", "cuda") and not name.startswith("cuda"):
        raise ValueError(f"data-parallel lazyattn runs take device=cuda or device=cpu, got {name!r}.")
    accelerator = Accelerator(cpu=on_cpu)  # cuda:LOCAL_RANK per process; gloo on CPU
    if accelerator.num_processes != int(os.environ["WORLD_SIZE"]):
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate sees {accelerator.num_processes} processes "
            f"({accelerator.distributed_type}); launch with `accelerate launch` or `torchrun` (on CPU: "
            "ACCELERATE_USE_CPU=true torchrun ...)."
        )
    return accelerator, accelerator.device


class LazyAttnLMM(lmms):
    """An lmms-eval chat model: a harness-loaded model with a ``lazyattn`` method applied."""

    is_simple = False

    def __init__(
        self,
        model: str = "llava_tiny",
        method: str = "dense",
        device: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        max_batch_size: int | None = None,  # passed by lmms-eval's CLI; unused
        **overrides,
    ) -> None:
        bad = [k for k in overrides if not k.startswith(("model.", "method."))]
        if bad:
            raise ValueError(
                f"unknown lazyattn model_args {bad}; use model=, method=, model.<key>=, method.<key>=, "
                "device=, batch_size=, max_new_tokens=."
            )
        overrides = [f"model={model}", f"method={method}", *(_override(k, v) for k, v in overrides.items())]
        check_overrides(overrides)  # an unknown preset or key: one line naming it
        cfg = compose(overrides)
        method = fixed_method(cfg.method, "the lazyattn lmms-eval model")
        accelerator, device = _data_parallel(device)
        loaded = load_model(cfg.model, device)
        self._init(loaded, method, device, batch_size, max_new_tokens)
        if accelerator is not None:
            self.accelerator = accelerator
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LazyAttnLMM:
        """What lmms-eval's CLI calls (``--model_args``, ``--device``, ``--batch_size``): a bad setting,
        a missing ``model.path`` or an absent CUDA device is one line and exit status 2, and so is any
        later failure of this model (``_fail``)."""
        try:
            self = super().create_from_arg_string(arg_string, additional_config)
        except (RunError, ValueError, FileNotFoundError) as err:
            cls._exit(f"the lazyattn model: {err}")
        self._cli = True
        return self

    @staticmethod
    def _exit(message: str):
        """One line on stderr and exit status 2. lmms-eval's CLI catches every ``Exception`` around the
        model and the tasks, prints its traceback and exits 0 (retried loads also wrap it in a
        ``RetryError``); ``SystemExit`` is no ``Exception``, so it ends the process as it should."""
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)

    def _fail(self, message: str):
        if getattr(self, "_cli", False):
            self._exit(message)
        raise RunError(message)  # the harness (from_loaded) prints it as its own one-line error

    @classmethod
    def from_loaded(
        cls,
        loaded: Loaded,
        method: Method,
        device,
        batch_size: int = 1,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> LazyAttnLMM:
        """Wrap a model the caller already loaded (the harness's ``task.backend=lmms_eval``)."""
        self = cls.__new__(cls)
        self._init(loaded, method, torch.device(device), batch_size, max_new_tokens)
        return self

    def _init(self, loaded: Loaded, method: Method, device, batch_size, max_new_tokens) -> None:
        lmms.__init__(self)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.loaded = loaded
        self.method = method
        self._device = torch.device(device)
        self._model = loaded.model.to(self._device)
        self.processor = loaded.processor
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self._warned: set[str] = set()
        self.first_prompt: tuple[list[dict], list[Image.Image]] | None = None  # the harness times this prompt

    @property
    def model(self):
        return self._model

    @property
    def device(self):
        return self._device

    def _budget(self, gen_kwargs: dict) -> int:
        for key in _SAMPLING_KEYS:
            value = gen_kwargs.get(key)
            if value not in (None, 0, 0.0, 1, False) and key not in self._warned:
                self._warned.add(key)
                warnings.warn(
                    f"lazyattn generates greedily; generation_kwargs {key}={value!r} is ignored.", stacklevel=3
                )
        return int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)

    def _prepare(self, request):
        _ctx, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
        try:
            history, images = to_history(doc_to_messages(self.task_dict[task][split][doc_id]))
        except NotImplementedError:
            raise
        except Exception as err:  # a corrupt image, a row the task's functions cannot read: name the row
            docs = self.task_dict[task][split]
            row = f"doc {doc_id}"
            if "id" in getattr(docs, "column_names", []):
                row += f" (id {docs.select_columns(['id'])[doc_id]['id']})"
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            self._fail(f"{task} ({split} split) {row}: its prompt or image cannot be read "
                       f"({type(err).__name__}: {first}); fix or re-export that row.")
        gen_kwargs = gen_kwargs or {}
        until = gen_kwargs.get("until") or []
        return history, images, self._budget(gen_kwargs), [until] if isinstance(until, str) else until

    def generate_until(self, requests) -> list[str]:
        """Greedy answers, ``batch_size`` requests at a time, in request order (``harness.generate.answer``;
        each request's prompt and images are read as the generator reaches it)."""
        stops: list[list[str]] = []

        def conversations():
            for i, request in enumerate(requests):
                history, images, budget, until = self._prepare(request)
                if self.first_prompt is None:
                    self.first_prompt = (history, images)
                stops.append(until)
                yield Conversation(str(i), history, images, [budget])

        with self.method.apply(self._model):
            texts = [a.prediction for a in answer(self._model, self.processor, conversations(), self.batch_size,
                                                  self._device)]
        return [_cut(text, until) for text, until in zip(texts, stops)]

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "the lazyattn model implements generate_until only; multiple-choice tasks scored by "
            "loglikelihood need their generation variant."
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the lazyattn model does not implement multi-round generation.")

