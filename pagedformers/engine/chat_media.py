"""Images and videos in chat messages: OpenAI's `image_url` and vLLM's `video_url` content parts (data: URLs), and
the PIL images and frame arrays offline users pass (`image_pil`, HF's `image` and `video`), turned into the content
HF chat templates render and the media the model's processor takes. Any other part, or media that does not decode,
is refused by name: never dropped.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from pagedformers.engine.video import decode_video, videos

IMAGE_PARTS = ("image_url", "image_pil", "image")
VIDEO_PARTS = ("video_url", "video")
MEDIA_PARTS = IMAGE_PARTS + VIDEO_PARTS


@dataclass
class ChatMedia:
    """A conversation's media, in the order its parts name them."""
    images: list[Image.Image] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)  # (frames [T, H, W, 3], metadata or None) each

    def as_data(self) -> dict[str, list[Any]]:
        """vLLM's multi_modal_data."""
        return {k: v for k, v in (("image", self.images), ("video", self.videos)) if v}


def split_media(messages: list[dict[str, Any]], name: str) -> tuple[list[dict[str, Any]], ChatMedia]:
    """(messages whose content is HF's parts, {"type": "image"} / {"type": "video"} where media was, and the media
    in order). Raises ValueError naming the message and part at fault."""
    out, media = [], ChatMedia()
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
                media.images.append(_image(part, kind, where))
                parts.append({"type": "image"})
            elif kind in VIDEO_PARTS:
                media.videos.append(_video(part, kind, where))
                parts.append({"type": "video"})
            else:
                raise ValueError(f"{where} is of type {kind!r}; pagedformers takes text, images "
                                 f"({', '.join(IMAGE_PARTS)}) and videos ({', '.join(VIDEO_PARTS)}) in chat messages")
        out.append({**message, "content": parts})
    return out, media


def media_kinds(messages: list[dict[str, Any]]) -> list[str]:
    """Which of "image" and "video" the messages' parts hold."""
    kinds = {p.get("type") for m in messages if isinstance(m.get("content"), list) for p in m["content"]
             if isinstance(p, dict)}
    return [kind for kind, parts in (("image", IMAGE_PARTS), ("video", VIDEO_PARTS)) if kinds & set(parts)]


def _video(part: dict[str, Any], kind: str, where: str) -> tuple[Any, dict[str, Any] | None]:
    """A video part's frames and metadata: given as such (offline), or a data: URL's encoded video, decoded."""
    value = part.get(kind)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        given = videos(value, where, allow_paths=False)  # a chat request never names a file on this machine
        if len(given) != 1:
            raise ValueError(f"{where}: a video part holds one video; got {len(given)}")
        return given[0]
    return decode_video(data_url_bytes(url, kind, where, "video/mp4"), where)


def _image(part: dict[str, Any], kind: str, where: str) -> Image.Image:
    value = part.get(kind)
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise ValueError(f"{where}: {kind} needs a PIL image or a URL")
    payload = data_url_bytes(url, kind, where, "image/png")  # its refusals name the URL's fault themselves
    try:
        image = Image.open(io.BytesIO(payload))
        image.load()
    except (ValueError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{where}: the image does not decode ({type(e).__name__}: {e})") from None
    return image.convert("RGB")


def data_url_bytes(url: str, kind: str, where: str, example_type: str) -> bytes:
    """A base64 data: URL's bytes (the server fetches http(s) and file:// URLs before they come here)."""
    if not url.startswith("data:"):
        raise ValueError(f"{where}: only data: URLs (data:{example_type};base64,...) are taken here; the server "
                         f"fetches http(s) and file:// URLs, offline pass the {kind.split('_')[0]} itself")
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise ValueError(f"{where}: a data: URL must be base64 (data:{example_type};base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as e:
        raise ValueError(f"{where}: the data: URL is not valid base64 ({e})") from None
