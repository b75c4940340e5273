"""Image-text-to-text checkpoints in Hugging Face format, read from a local directory only."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from harness.models.base import Loaded, set_generation_ids
from harness.models.processors import IMAGE_ONLY_PROCESSORS


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_checkpoint(path, model_type: str | None = None) -> Path:
    """The checkpoint folder ``path`` as a Path, or one clear error, from its files alone (no
    weights are read): it exists, holds config.json (of ``model_type`` when given) and the
    processor's and tokenizer's files, which ``save_pretrained`` of the model alone leaves out."""
    if path is None or str(path) in ("", "None", "???"):
        raise ValueError("model.path is not set: pass model.path=/local/dir holding config.json and the weights.")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model.path {str(path)!r} does not exist or is not a directory.")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json: model.path must be a local Hugging Face checkpoint directory "
            "(config.json, *.safetensors, tokenizer and processor files)."
        )
    found_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type is not None and found_type != model_type:
        raise ValueError(
            f"{path} holds a {found_type!r} checkpoint but this preset expects model_type {model_type!r}: "
            "point model.path at the right checkpoint, or use model=hf for any LLaVA-family checkpoint."
        )
    missing = [f"{what} files (one of {', '.join(names)})"
               for what, names in (("processor", PROCESSOR_FILES), ("tokenizer", TOKENIZER_FILES))
               if not any((path / name).is_file() for name in names)]
    if missing:
        raise FileNotFoundError(
            f"{path} has no {' and no '.join(missing)}: save them beside the weights with "
            "AutoProcessor.from_pretrained(SOURCE).save_pretrained(model.path)."
        )
    return path


def load_local(
    path: str | Path,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype | str = "auto",
    name: str | None = None,
    model_type: str | None = None,
) -> Loaded:
    """Load an image-text-to-text checkpoint (HF format) from a local directory, never from a hub.

    ``model_type``, when given (the presets give it), must match the checkpoint's config.json.
    Qwen2-VL / Qwen2.5-VL get an image-and-text processor (``harness.models.processors``): their
    own processor also loads a video processor, which needs torchvision.
    """
    path = check_checkpoint(path, model_type)
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as err:  # unknown model_type, corrupt config
        raise ValueError(f"cannot read the config in {path} (model_type={model_type!r}): {err}") from err
    if type(config) not in AutoModelForImageTextToText._model_mapping:
        raise ValueError(
            f"{path} holds a {model_type!r} model, which is not an image-text-to-text model; model.path must be a "
            "multimodal checkpoint such as LLaVA-1.5, LLaVA-NeXT, Qwen2-VL or Qwen2.5-VL."
        )
    model = AutoModelForImageTextToText.from_pretrained(
        path, local_files_only=True, attn_implementation=attn_implementation, dtype=dtype
    )
    processor_cls = IMAGE_ONLY_PROCESSORS.get(model_type, AutoProcessor)
    processor = processor_cls.from_pretrained(path, local_files_only=True)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    set_generation_ids(model, tokenizer)
    return Loaded(model=model.eval(), processor=processor, name=name or path.name)
