"""Media the server fetches for chat requests: `image_url` and `video_url` parts with http(s) URLs (only from the
allowed domains, when the operator names some) and file:// URLs (only under --allowed-local-media-path), read with a
timeout and a size cap, decoded, and handed on as images and frames. Fetching is asynchronous and videos decode in a
thread: the event loop keeps serving meanwhile. A URL that is not allowed, not reachable, too large or not an image
(a video) is a 400 naming the message part.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

import httpx
import numpy as np
from PIL import Image

from pagedformers.engine.chat_media import data_url_bytes
from pagedformers.engine.video import decode_video
from pagedformers.entrypoints.openai.errors import OpenAIError


@dataclass(frozen=True)
class MediaPolicy:
    # Hosts http(s) images may come from. None: any public host; loopback, private and link-local addresses (the
    # machine itself, its network, cloud metadata services) only when named here.
    allowed_domains: tuple[str, ...] | None = None
    allowed_local_path: str | None = None  # file:// URLs under this directory; None: refused
    timeout_s: float = 5.0
    max_bytes: int = 20 << 20


async def fetch_media(messages: list[dict[str, Any]], policy: MediaPolicy) -> list[dict[str, Any]]:
    """The messages with every http(s) or file:// `image_url` (`video_url`) part replaced by an `image_pil`
    (`video`) part holding the decoded image (frames); other parts (data: URLs included) as they were."""
    out = []
    async with httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=False) as client:
        for i, message in enumerate(messages):
            content = message.get("content")
            if not isinstance(content, list):
                out.append(message)
                continue
            parts = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                url = _remote_url(part)
                if url is None:
                    parts.append(await _decoded_data_video(part, where))
                    continue
                data = await _read(client, url, policy, where)
                if part["type"] == "video_url":
                    parts.append({"type": "video", "video": await asyncio.to_thread(_decode_video, data, where)})
                else:
                    parts.append({"type": "image_pil", "image_pil": _decode(data, where)})
            out.append({**message, "content": parts})
    return out


async def _decoded_data_video(part: Any, where: str) -> Any:
    """A `video_url` part with a data: URL decoded in a thread (a `video` part), not on the event loop later; any
    other part as it is."""
    value = part.get("video_url") if isinstance(part, dict) and part.get("type") == "video_url" else None
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url.startswith("data:"):
        return part
    try:
        video = await asyncio.to_thread(decode_video, data_url_bytes(url, "video_url", where, "video/mp4"), where)
    except ValueError as e:
        raise OpenAIError(str(e), 400, "messages") from None
    return {"type": "video", "video": video}


def _remote_url(part: Any) -> str | None:
    if not isinstance(part, dict) or part.get("type") not in ("image_url", "video_url"):
        return None
    value = part.get(part["type"])
    url = value.get("url") if isinstance(value, dict) else value
    return url if isinstance(url, str) and url.split(":", 1)[0].lower() in ("http", "https", "file") else None


async def _read(client: httpx.AsyncClient, url: str, policy: MediaPolicy, where: str) -> bytes:
    parsed = urlparse(url)
    if parsed.scheme.lower() == "file":
        return _read_local(unquote(parsed.path), policy, where)
    host = (parsed.hostname or "").lower()
    if policy.allowed_domains is not None and host not in policy.allowed_domains:
        raise OpenAIError(f"{where}: media from {host!r} are not allowed on this server (--allowed-media-domains)",
                          400, "messages")
    if policy.allowed_domains is None and await _is_internal(host, parsed.port):
        raise OpenAIError(f"{where}: {host!r} is a loopback, private or link-local address: media from it are "
                          "refused unless --allowed-media-domains names it", 400, "messages")
    try:
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise OpenAIError(f"{where}: fetching {url} answered HTTP {response.status_code}", 400, "messages")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > policy.max_bytes:
                    raise OpenAIError(f"{where}: the image at {url} is larger than {policy.max_bytes} bytes", 400,
                                      "messages")
            return bytes(data)
    except httpx.HTTPError as e:
        raise OpenAIError(f"{where}: could not fetch {url}: {type(e).__name__}: {e}", 400, "messages") from None


async def _is_internal(host: str, port: int | None) -> bool:
    """Whether any address the host resolves to is not a public one (a name that does not resolve is left to the
    fetch, which then fails)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port or 80, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    return any(a.is_loopback or a.is_private or a.is_link_local or a.is_reserved or a.is_unspecified
               for a in addresses)


def _read_local(path: str, policy: MediaPolicy, where: str) -> bytes:
    if policy.allowed_local_path is None:
        raise OpenAIError(f"{where}: file:// images are refused unless the server names a directory for them "
                          "(--allowed-local-media-path)", 400, "messages")
    root, real = os.path.realpath(policy.allowed_local_path), os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise OpenAIError(f"{where}: {path} is outside --allowed-local-media-path", 400, "messages")
    try:
        if os.path.getsize(real) > policy.max_bytes:
            raise OpenAIError(f"{where}: {path} is larger than {policy.max_bytes} bytes", 400, "messages")
        with open(real, "rb") as f:
            return f.read()
    except OSError as e:
        raise OpenAIError(f"{where}: could not read {path}: {e.strerror}", 400, "messages") from None


def _decode_video(data: bytes, where: str) -> tuple[np.ndarray, dict[str, Any] | None]:
    try:
        return decode_video(data, where)
    except ValueError as e:
        raise OpenAIError(str(e), 400, "messages") from None


def _decode(data: bytes, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise OpenAIError(f"{where}: the image does not decode ({type(e).__name__}: {e})", 400, "messages") from None
    return image.convert("RGB")
