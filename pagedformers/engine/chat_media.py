"""Images in chat messages: OpenAI's `image_url` content parts (data: URLs), and the PIL images offline users pass
(vLLM's `image_pil`, HF's `image`), turned into the content HF chat templates render and the images the model's
processor takes. Any other part, or an image that does not decode, is refused by name: never dropped.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from PIL import Image

IMAGE_PARTS = ("image_url", "image_pil", "image")


def split_media(messages: list[dict[str, Any]], name: str) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """(messages whose content is HF's parts, {"type": "image"} where an image was, and the images in order).
    Raises ValueError naming the message and part at fault."""
    out, images = [], []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            out.append({**message, "content": [{"type": "text", "text": content}] if isinstance(content, str)
                        else content})
            continue
        parts = []
        for j, part in enumerate(content):
            where = f"{name}: messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            elif kind in IMAGE_PARTS:
                images.append(_image(part, kind, where))
                parts.append({"type": "image"})
            else:
                raise ValueError(f"{where} is of type {kind!r}; pagedformers takes text and images "
                                 f"({', '.join(IMAGE_PARTS)}) in chat messages")
        out.append({**message, "content": parts})
    return out, images


def has_media(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m.get("content"), list) and any(isinstance(p, dict) and p.get("type") in IMAGE_PARTS
                                                          for p in m["content"]) for m in messages)


def _image(part: dict[str, Any], kind: str, where: str) -> Image.Image:
    value = part.get(kind)
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise ValueError(f"{where}: {kind} needs a PIL image or a URL")
    if not url.startswith("data:"):
        raise ValueError(f"{where}: only data: URLs (data:image/png;base64,...) are taken here; the server fetches "
                         "http(s) and file:// URLs, offline pass the image itself (a PIL image)")
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise ValueError(f"{where}: a data: URL must be base64 (data:image/...;base64,...)")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        image.load()
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{where}: the image does not decode ({type(e).__name__}: {e})") from None
    return image.convert("RGB")
