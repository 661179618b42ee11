"""A checkpoint's HF processor, loaded for images where the parts it cannot run here need torchvision.

transformers 5 builds a processor with every sub-processor its class names. The video processors of
Qwen2-VL, SmolVLM, InternVL or the LLaVA-OneVision/NeXT-Video families need torchvision (an optional
dependency: the "video" extra); without it AutoProcessor fails for the whole checkpoint. Where that is
the cause, the same processor class is loaded without its video processor: images (PIL backend) and text
work as in HF, and its saved settings (image_seq_len, ...) are kept. Mistral 3's PixtralProcessor needs
torchvision only for one helper its module imports, which the PIL image processor's module has too.
"""

from __future__ import annotations

import functools
import json
import sys
import types
from pathlib import Path

import transformers
from transformers import AutoProcessor, ProcessorMixin
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.utils import is_torchvision_available

from pagedformers.logger import init_logger

logger = init_logger(__name__)


def load_processor(path: str, model_type: str, trust_remote_code: bool = False) -> ProcessorMixin:
    # GLM-OCR ships GLM-4.6V's processor: transformers maps none to its model_type, the checkpoint names it
    name = PROCESSOR_MAPPING_NAMES.get(model_type) or _saved_processor_class(path)
    if name == "PixtralProcessor":
        pixtral_without_torchvision()
    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, OSError) as e:  # a video sub-processor needs torchvision (or was saved without it)
        cls = getattr(transformers, name or "", None)
        about_video = "torchvision" in str(e).lower() or "video" in str(e).lower()  # not, say, num2words missing
        if is_torchvision_available() or not about_video or not isinstance(cls, type) or not _video_parts(cls):
            raise
        logger.info("%s: loading %s without its video processor (%s: torchvision is not installed)", path,
                    cls.__name__, type(e).__name__)
        return image_only(cls).from_pretrained(path, trust_remote_code=trust_remote_code)


def _saved_processor_class(path: str) -> str | None:
    """The processor class a checkpoint's processor_config.json names."""
    file = Path(path) / "processor_config.json"
    return json.loads(file.read_text()).get("processor_class") if file.is_file() else None


def _video_parts(cls: type[ProcessorMixin]) -> list[str]:
    return [name for name in cls.get_attributes() if "video" in name]


class _WithoutVideoParts(ProcessorMixin):
    """Between a processor class and ProcessorMixin: the class's own __init__ hands its sub-processors on in
    its full order (video first for LLaVA-NeXT-Video, last for most); the video ones are dropped here."""

    all_parts: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs) -> None:
        parts = self.all_parts
        args = [a for a, name in zip(args, parts) if "video" not in name] + list(args[len(parts):])
        for name in parts:
            if "video" in name:
                kwargs.pop(name, None)
        ProcessorMixin.__init__(self, *args, **kwargs)


@functools.cache
def image_only(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`cls` without its video sub-processors (built with video_processor=None). It keeps `cls.__init__`, whose
    signature tells transformers which saved settings to pass, and its name, so that what it saves names `cls`."""
    videos = _video_parts(cls)

    def get_attributes(sub: type) -> list[str]:
        return [name for name in cls.get_attributes() if name not in videos]

    def from_args_and_dict(sub: type, args: list, processor_dict: dict, **kwargs):  # noqa: ANN202
        named = dict(zip(sub.get_attributes(), args))  # by name: a video part may come first in cls.__init__
        out = super(subclass, sub).from_args_and_dict([], processor_dict, **named, **dict.fromkeys(videos),
                                                     **kwargs)
        for name in videos:  # there, and None: a video prompt is refused by the engine, not by an AttributeError
            setattr(out[0] if isinstance(out, tuple) else out, name, None)
        return out

    subclass = type(cls.__name__, (cls, _WithoutVideoParts), {
        "get_attributes": classmethod(get_attributes), "from_args_and_dict": classmethod(from_args_and_dict),
        "all_parts": tuple(cls.get_attributes()), "__module__": cls.__module__})
    return subclass


def pixtral_without_torchvision() -> None:
    """Make transformers.PixtralProcessor the real class: without torchvision it is a placeholder that raises,
    because its module imports get_resize_output_image_size from the torchvision image processor's module. The
    PIL image processor's module has the same function; a stand-in module holding it takes the other's place."""
    current = getattr(transformers, "PixtralProcessor", None)
    if is_torchvision_available() or (isinstance(current, type) and issubclass(current, ProcessorMixin)):
        return
    from transformers.models.pixtral import image_processing_pil_pixtral as pil

    name = "transformers.models.pixtral.image_processing_pixtral"
    stand_in = types.ModuleType(name)
    stand_in.get_resize_output_image_size = pil.get_resize_output_image_size
    sys.modules.setdefault(name, stand_in)
    from transformers.models.pixtral.processing_pixtral import PixtralProcessor

    transformers.models.pixtral.PixtralProcessor = transformers.PixtralProcessor = PixtralProcessor
