"""Multimodal model families built from a shape with seeded random weights, nothing downloaded.

``family`` is one of ``llava`` (CLIP tower, 2-layer projector, a Llama, Mistral or Qwen2 text
backbone), ``llava_next`` (the same with anyres tiling), ``qwen2_vl`` and ``qwen2_5_vl`` (their
own vision towers, a Qwen2 text model with M-RoPE). ``text`` and ``vision`` are plain mappings
of the shape (see ``TEXT_KEYS`` / ``VISION_KEYS``): the ``*_random`` model presets give the real
checkpoints' shapes (docs/gpu.md) for throughput and KV-memory runs on a GPU, the
tests give tiny ones. The tokenizer is always the tiny word-level one (the vocabulary size of
the embedding and LM head still follows ``text.vocab``), and the image processors are the PIL
ones, so neither the hub nor torchvision is needed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    MistralConfig,
    PretrainedConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from harness.models.base import Loaded, set_generation_ids
from harness.models.processors import Qwen2_5_VLImageTextProcessor, Qwen2VLImageTextProcessor
from harness.models.tiny import (
    QWEN_VL_TOKENS,
    TINY_CHAT_TEMPLATE,
    TINY_QWEN_VL_CHAT_TEMPLATE,
    tiny_processor,
    tiny_tokenizer,
)

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
BACKBONES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
MODEL_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
}
# The keys each mapping may hold (values without a default are required).
TEXT_KEYS = {
    "backbone": "llama",  # llava / llava_next only: llama | mistral | qwen2
    "layers": None,
    "hidden": None,
    "heads": None,
    "kv_heads": None,
    "mlp": None,
    "vocab": None,  # null: the tiny tokenizer's size
    "rope_theta": 10000.0,
    "mrope_section": None,  # qwen2_vl / qwen2_5_vl: temporal/height/width split of head_dim / 2
    "max_positions": 4096,
    "rms_eps": 1e-5,
}
VISION_KEYS = {
    "layers": None,  # llava / llava_next: CLIP depth; qwen2_vl / qwen2_5_vl: ViT depth
    "hidden": None,
    "mlp": None,
    "heads": None,
    "patch": None,
    "image_size": None,  # llava: the square input; qwen: images are resized to about image_size**2 pixels
    "projection_dim": None,  # CLIP only; null: the vision hidden size
    "grid_pinpoints": None,  # llava_next: anyres tiling resolutions
    "merge": 2,  # qwen: spatial merge (merge x merge patches -> one token)
    "temporal_patch": 2,  # qwen
    "window_size": None,  # qwen2_5_vl: windowed attention span in pixels
    "fullatt_blocks": None,  # qwen2_5_vl: blocks with full attention
}


# Every family at a tiny size (4 text layers): what the family tests and `make gpu-check`'s
# correctness matrix build, name -> (family, text, vision).
TINY_TEXT = dict(layers=4, hidden=64, heads=4, kv_heads=2, mlp=128)
TINY_CLIP = dict(layers=2, hidden=32, mlp=64, heads=2, patch=8, image_size=32)
TINY_QWEN_VISION = dict(layers=2, hidden=32, mlp=64, heads=2, patch=8, image_size=64, window_size=32)
TINY_SHAPES = {
    "llava_llama": ("llava", {**TINY_TEXT, "backbone": "llama"}, TINY_CLIP),
    "llava_qwen2": ("llava", {**TINY_TEXT, "backbone": "qwen2"}, TINY_CLIP),
    "llava_mistral": ("llava", {**TINY_TEXT, "backbone": "mistral"}, TINY_CLIP),
    "llava_next_mistral": ("llava_next", {**TINY_TEXT, "backbone": "mistral"}, TINY_CLIP),
    "qwen2_vl": ("qwen2_vl", {**TINY_TEXT, "mrope_section": [2, 3, 3]}, TINY_QWEN_VISION),
    "qwen2_5_vl": ("qwen2_5_vl", {**TINY_TEXT, "mrope_section": [2, 3, 3]}, TINY_QWEN_VISION),
}


REQUIRED = {
    "text": ("layers", "hidden", "heads", "kv_heads", "mlp"),
    "vision": ("layers", "hidden", "heads", "patch", "image_size"),  # and mlp, except for qwen2_vl
}


def _spec(kind: str, given: Mapping, family: str) -> dict:
    """``given`` over the defaults of ``TEXT_KEYS`` / ``VISION_KEYS``, checked for unknown and missing keys."""
    keys = TEXT_KEYS if kind == "text" else VISION_KEYS
    unknown = sorted(set(given) - set(keys))
    if unknown:
        raise ValueError(f"model.{kind} has unknown keys {unknown}; known: {sorted(keys)}.")
    spec = {**keys, **given}
    required = REQUIRED[kind] + (("mlp",) if kind == "vision" and family != "qwen2_vl" else ())
    missing = [k for k in required if spec[k] is None]
    if missing:
        raise ValueError(f"model.{kind} for family {family} needs {missing}.")
    return spec


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"model.family must be one of {', '.join(FAMILIES)}, got {family!r}.")


def family_tokenizer(family: str):
    _check_family(family)
    return tiny_tokenizer(QWEN_VL_TOKENS if family.startswith("qwen") else None)


def random_config(
    family: str, text: Mapping, vision: Mapping, tokenizer=None, initializer_range: float = 0.02
) -> PretrainedConfig:
    """The model config for a shape; nothing is instantiated."""
    _check_family(family)
    tokenizer = tokenizer if tokenizer is not None else family_tokenizer(family)
    t, v = _spec("text", text, family), _spec("vision", vision, family)
    text_kwargs = dict(
        vocab_size=t["vocab"] or len(tokenizer),
        hidden_size=t["hidden"],
        intermediate_size=t["mlp"],
        num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"],
        num_key_value_heads=t["kv_heads"],
        max_position_embeddings=t["max_positions"],
        rms_norm_eps=t["rms_eps"],
        initializer_range=initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    rope = {"rope_type": "default", "rope_theta": float(t["rope_theta"])}
    if family in ("llava", "llava_next"):
        if t["backbone"] not in BACKBONES:
            raise ValueError(f"model.text.backbone must be one of {', '.join(BACKBONES)}, got {t['backbone']!r}.")
        if t["backbone"] == "mistral":
            text_kwargs["sliding_window"] = None  # full attention, as in the v0.2 Mistral behind LLaVA-NeXT
        if t["backbone"] == "qwen2":
            text_kwargs["use_sliding_window"] = False
        text_config = BACKBONES[t["backbone"]](rope_parameters=rope, **text_kwargs)
        vision_config = CLIPVisionConfig(
            hidden_size=v["hidden"],
            intermediate_size=v["mlp"],
            num_hidden_layers=v["layers"],
            num_attention_heads=v["heads"],
            image_size=v["image_size"],
            patch_size=v["patch"],
            projection_dim=v["projection_dim"] or v["hidden"],
        )
        common = dict(
            vision_config=vision_config,
            text_config=text_config,
            image_token_id=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_seq_length=(v["image_size"] // v["patch"]) ** 2,
            initializer_range=initializer_range,
            tie_word_embeddings=False,
        )
        if family == "llava":
            return LlavaConfig(**common)
        return LlavaNextConfig(image_grid_pinpoints=_pinpoints(v), **common)

    head_dim = t["hidden"] // t["heads"]
    section = list(t["mrope_section"] or [])
    if len(section) != 3 or sum(section) * 2 != head_dim:
        raise ValueError(f"model.text.mrope_section must be 3 numbers summing to head_dim / 2 = {head_dim // 2}, "
                         f"got {t['mrope_section']!r}.")
    text_kwargs.update(use_sliding_window=False, rope_parameters={**rope, "mrope_section": section})
    vision_kwargs = dict(
        depth=v["layers"],
        num_heads=v["heads"],
        patch_size=v["patch"],
        spatial_merge_size=v["merge"],
        temporal_patch_size=v["temporal_patch"],
        initializer_range=initializer_range,
    )
    if family == "qwen2_vl":
        mlp = v["mlp"] or 4 * v["hidden"]
        if mlp % v["hidden"]:
            raise ValueError("model.vision.mlp must be a multiple of model.vision.hidden for qwen2_vl (mlp_ratio).")
        vision_kwargs.update(embed_dim=v["hidden"], hidden_size=t["hidden"], mlp_ratio=mlp // v["hidden"])
        config_cls = Qwen2VLConfig
    else:
        vision_kwargs.update(
            hidden_size=v["hidden"],
            intermediate_size=v["mlp"],
            out_hidden_size=t["hidden"],
            window_size=v["window_size"] or 112,
            fullatt_block_indexes=list(v["fullatt_blocks"] if v["fullatt_blocks"] is not None else [v["layers"] - 1]),
            tokens_per_second=2,
        )
        config_cls = Qwen2_5_VLConfig
    ids = {f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in QWEN_VL_TOKENS.items()}
    return config_cls(text_config=text_kwargs, vision_config=vision_kwargs, tie_word_embeddings=False, **ids)


def _pinpoints(v: Mapping) -> list[list[int]]:
    if v["grid_pinpoints"] is not None:
        return [list(p) for p in v["grid_pinpoints"]]
    s = v["image_size"]  # LLaVA-NeXT's default tiling: 1x2, 2x1, 2x2, 3x1, 1x3 tiles
    return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]


def family_processor(family: str, vision: Mapping, tokenizer=None):
    """A processor for the family on the tiny tokenizer, with a PIL image processor."""
    _check_family(family)
    tokenizer = tokenizer if tokenizer is not None else family_tokenizer(family)
    v = _spec("vision", vision, family)
    size = v["image_size"]
    if family == "llava":
        return tiny_processor(size, v["patch"], tokenizer)
    if family == "llava_next":
        kwargs = dict(
            patch_size=v["patch"],
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
            chat_template=TINY_CHAT_TEMPLATE,
        )
        crop = {"height": size, "width": size}
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": size}, crop_size=crop, image_grid_pinpoints=_pinpoints(v)
        )
        return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, **kwargs)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=size * size,
        max_pixels=size * size,
        patch_size=v["patch"],
        merge_size=v["merge"],
        temporal_patch_size=v["temporal_patch"],
    )
    cls = Qwen2VLImageTextProcessor if family == "qwen2_vl" else Qwen2_5_VLImageTextProcessor
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=TINY_QWEN_VL_CHAT_TEMPLATE)


def build_random(
    family: str,
    text: Mapping,
    vision: Mapping,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    initializer_range: float = 0.02,
    name: str | None = None,
) -> Loaded:
    """The family's model at this shape with seeded random weights, built directly on ``device``."""
    tokenizer = family_tokenizer(family)
    processor = family_processor(family, vision, tokenizer)
    config = random_config(family, text, vision, tokenizer, initializer_range=initializer_range)
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        model = MODEL_CLASSES[family]._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    set_generation_ids(model, tokenizer)
    return Loaded(model=model.eval(), processor=processor, name=name or f"{family}_random", random_weights=True)
