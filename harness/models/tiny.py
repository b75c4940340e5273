"""The tiny models' text side: a word-level tokenizer over the shapes vocabulary, LLaVA's chat
layout, and LLaVA's processor with the PIL CLIP image processor.

Nothing is downloaded and torchvision is not needed. The shipped ``llava_tiny`` checkpoint was
saved with these, and every random-weight preset (``harness.models.families``) uses them, so
the whole harness runs offline.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

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
