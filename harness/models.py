"""Models the harness can run: a tiny random LLaVA built in memory, and any local HF checkpoint.

Nothing is downloaded: the tiny model's tokenizer is a word-level vocabulary built from the
shapes benchmark, its image processor is the PIL CLIP processor (no torchvision), and real
checkpoints are read from a local directory only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from harness.processors import IMAGE_ONLY_PROCESSORS
from harness.tasks import shapes

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
CHAT_WORDS = ("user", "assistant", ":")

# Qwen2-VL's vision markers; the processor expands <|image_pad|> to one token per merged patch.
QWEN_VL_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}


def tiny_chat_template(image_placeholder: str = "<image>") -> str:
    """LLaVA-1.5's conversation layout ("USER: <image> ... ASSISTANT:") in the tiny vocabulary."""
    return (
        "{% for m in messages %}"
        "{% if m['role'] == 'user' %}user : "
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image_placeholder + " {% endif %}{% endfor %}"
        "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}"
        "{% else %}assistant : "
        "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}</s> "
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )


TINY_CHAT_TEMPLATE = tiny_chat_template()
# Qwen2-VL's image block, <|vision_start|><|image_pad|><|vision_end|>, in the same layout.
TINY_QWEN_VL_CHAT_TEMPLATE = tiny_chat_template(
    QWEN_VL_TOKENS["vision_start_token"] + QWEN_VL_TOKENS["image_token"] + QWEN_VL_TOKENS["vision_end_token"]
)


@dataclasses.dataclass
class Loaded:
    model: torch.nn.Module
    processor: object
    name: str

    @property
    def n_layers(self) -> int:
        return self.model.config.get_text_config(decoder=True).num_hidden_layers

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def tiny_tokenizer(special_tokens: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the shapes vocabulary; pads on the left for batched generation.

    ``special_tokens`` (name -> token, e.g. ``QWEN_VL_TOKENS``) replaces the LLaVA ``<image>``
    token; new tokens go after the shared vocabulary, so the shared ids do not move.
    """
    special_tokens = special_tokens or {"image_token": "<image>"}
    vocab = list(SPECIAL_TOKENS) + [w for w in CHAT_WORDS + tuple(shapes.VOCAB) if w not in SPECIAL_TOKENS]
    vocab = list(dict.fromkeys(vocab + list(special_tokens.values())))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        extra_special_tokens=dict(special_tokens),
    )
    return tok


def tiny_processor(image_size: int = 64, patch_size: int = 8, tokenizer=None) -> LlavaProcessor:
    """LLaVA's processor with the PIL CLIP image processor; the tiny word-level tokenizer by default."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer() if tokenizer is None else tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=TINY_CHAT_TEMPLATE,
    )


def tiny_llava_config(
    tokenizer: PreTrainedTokenizerFast,
    n_layers: int = 12,
    hidden_size: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    intermediate_size: int = 128,
    image_size: int = 64,
    patch_size: int = 8,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    initializer_range: float = 0.02,
) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=512,
        initializer_range=initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch_size) ** 2,
        initializer_range=initializer_range,
    )


def build_tiny_llava(
    seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32, **config_kwargs
) -> Loaded:
    """A LLaVA (CLIP tower, 2-layer projector, Llama backbone, GQA) with seeded random weights."""
    processor = tiny_processor(
        image_size=config_kwargs.get("image_size", 64), patch_size=config_kwargs.get("patch_size", 8)
    )
    config = tiny_llava_config(processor.tokenizer, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    _set_generation_ids(model, processor.tokenizer)
    return Loaded(model=model.eval(), processor=processor, name="llava_tiny_random")


def load_local(
    path: str | Path,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype | str = "auto",
    name: str | None = None,
    model_type: str | None = None,
) -> Loaded:
    """Load an image-text-to-text checkpoint (HF format) from a local directory, never from a hub.

    ``model_type``, when given (the presets give it), must match the checkpoint's config.json.
    Qwen2-VL / Qwen2.5-VL get an image-and-text processor (``harness.processors``): their own
    processor also loads a video processor, which needs torchvision.
    """
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
    model_type = found_type
    try:
        AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as err:  # unknown model_type, corrupt config
        raise ValueError(f"cannot read the config in {path} (model_type={model_type!r}): {err}") from err
    model = AutoModelForImageTextToText.from_pretrained(
        path, local_files_only=True, attn_implementation=attn_implementation, dtype=dtype
    )
    processor_cls = IMAGE_ONLY_PROCESSORS.get(model_type, AutoProcessor)
    processor = processor_cls.from_pretrained(path, local_files_only=True)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    _set_generation_ids(model, tokenizer)
    return Loaded(model=model.eval(), processor=processor, name=name or path.name)


def _set_generation_ids(model, tokenizer) -> None:
    gen = model.generation_config
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
