"""Processors that work without torchvision.

transformers' Qwen2-VL and Qwen2.5-VL processors take a video processor, and every video
processor needs torchvision; building or loading them without it fails. The harness feeds
images only, so these subclasses drop the video processor from the processor's attributes:
text and image handling (the <|image_pad|> expansion by image_grid_thw) is the parent's own,
and the image processor is the PIL one (``Qwen2VLImageProcessorPil``) that AutoImageProcessor
picks when torchvision is absent.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor


class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor for images and text only (no video processor, so no torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images and text only (no video processor, so no torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


# model_type in config.json -> the image-only processor to load for it
IMAGE_ONLY_PROCESSORS = {"qwen2_vl": Qwen2VLImageTextProcessor, "qwen2_5_vl": Qwen2_5_VLImageTextProcessor}
