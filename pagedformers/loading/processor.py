"""A checkpoint's HF processor, loaded for images where its video half cannot be.

transformers 5 builds a processor with every sub-processor its class names. The video processors of
Qwen2-VL, Qwen2.5-VL, SmolVLM or LLaVA-OneVision need torchvision, which cannot be installed beside a CPU
build of torch; AutoProcessor then fails for the whole checkpoint. Where that is the cause, the same
processor class is loaded without its video processor: images (PIL backend) and text work as in HF, and
a video prompt is refused by name.
"""

from __future__ import annotations

import functools
import inspect

import transformers
from transformers import AutoProcessor, ProcessorMixin
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.utils import is_torchvision_available

from pagedformers.logger import init_logger

logger = init_logger(__name__)


def load_processor(path: str, model_type: str, trust_remote_code: bool = False) -> ProcessorMixin:
    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        cls = getattr(transformers, PROCESSOR_MAPPING_NAMES.get(model_type) or "", None)
        if is_torchvision_available() or cls is None or "video_processor" not in inspect.signature(cls).parameters:
            raise
        logger.info("%s: loading %s without its video processor (%s: torchvision is not installed)", path,
                    cls.__name__, type(e).__name__)
        return image_only(cls).from_pretrained(path, trust_remote_code=trust_remote_code)


def has_video(processor: ProcessorMixin) -> bool:
    return getattr(processor, "video_processor", None) is not None


@functools.cache
def image_only(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`cls` whose constructor takes no video processor: transformers derives a processor's parts from it."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:  # noqa: N807
        cls.__init__(self, image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})
