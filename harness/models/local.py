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
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    # before the processor files: a text-only checkpoint needs another model, not more files
    if found_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(
            f"{path} holds a {found_type!r} model, which is not an image-text-to-text model; model.path must be a "
            "multimodal checkpoint such as LLaVA-1.5, LLaVA-NeXT, Qwen2-VL or Qwen2.5-VL."
        )
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights)
    missing = [f"{what} files (one of {', '.join(names)})"
               for what, names in (("processor", PROCESSOR_FILES), ("tokenizer", TOKENIZER_FILES))
               if not any((path / name).is_file() for name in names)]
    if missing:
        raise FileNotFoundError(
            f"{path} has no {' and no '.join(missing)}: save them beside the weights with "
            "AutoProcessor.from_pretrained(SOURCE).save_pretrained(model.path)."
        )
    return path


def check_safetensors(path: Path) -> None:
    """A ValueError of one line unless ``path`` is a whole safetensors file, read from its header
    alone: an 8-byte length, a JSON header of that length, and tensors that end where the file does
    (a truncated download or an overwritten header is caught before the model loads)."""
    import struct

    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if not 2 <= length <= size - 8:
                raise ValueError(f"a header length of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise ValueError(f"{path} is no readable safetensors file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'unreadable header'}); download or save "
                         "the weights again.") from None
    if 8 + length + max(ends, default=0) != size:
        raise ValueError(f"{path} is cut or padded: its header describes {8 + length + max(ends, default=0)} bytes, "
                         f"the file holds {size}; download or save the weights again.")


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
    from safetensors import SafetensorError

    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, local_files_only=True, attn_implementation=attn_implementation, dtype=dtype
        )
    except (SafetensorError, OSError) as err:  # damage the header check cannot see: one line, not a traceback
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load the weights in {path} ({type(err).__name__}: {first}); download or save "
                         "them again.") from None
    processor_cls = IMAGE_ONLY_PROCESSORS.get(model_type, AutoProcessor)
    processor = processor_cls.from_pretrained(path, local_files_only=True)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    set_generation_ids(model, tokenizer)
    return Loaded(model=model.eval(), processor=processor, name=name or path.name)
