"""Videos as the model's processor takes them: frames [T, H, W, 3], from what users give (vLLM's shapes) or from
an encoded file (decoded with av, the "video" extra)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

MAX_VIDEO_FRAMES = 32  # frames kept of a decoded video file, evenly spaced (vLLM's default)
MAX_VIDEO_PIXELS = 4096 * 2160  # a frame's width x height past 4K is refused: a small file can name huge frames


def videos(given: Any, name: str, allow_paths: bool = True) -> list[tuple[Any, dict[str, Any] | None]]:
    """One prompt's videos, each (frames, metadata or None): frames [T, H, W, C] (an array or tensor) or a list of
    PIL images, and vLLM's metadata dict (fps, duration, ...: what the processor samples frames and writes
    timestamps by), from one video as such, a (frames, metadata) pair, a file path (decoded: its metadata comes
    from the file; only where `allow_paths`: never for what a chat request names), or a list of these."""
    if isinstance(given, (str, Path)):
        if not allow_paths:
            raise ValueError(f"{name}: a video here is frames or a data: URL, not a file path (the server reads "
                             "files only from file:// URLs under --allowed-local-media-path)")
        return [decode_video(Path(given), name)]
    if isinstance(given, tuple) and len(given) == 2 and (given[1] is None or isinstance(given[1], dict)):
        inner = videos(given[0], name, allow_paths)
        if len(inner) != 1:
            raise ValueError(f"{name}: a (frames, metadata) pair holds one video; got {len(inner)}")
        return [(inner[0][0], given[1] if given[1] is not None else inner[0][1])]
    if isinstance(given, (np.ndarray, torch.Tensor)) or (isinstance(given, (list, tuple)) and given
                                                         and isinstance(given[0], Image.Image)):
        return [(given, None)]
    if isinstance(given, (list, tuple)) and given:
        return [v for one in given for v in videos(one, name, allow_paths)]
    raise ValueError(f"{name}: a video is frames [T, H, W, C] (array or tensor), a list of PIL images, a (frames, "
                     f"metadata) pair or a file path; got {type(given).__name__}")


def decode_video(source: Path | bytes, name: str,
                 max_frames: int = MAX_VIDEO_FRAMES) -> tuple[np.ndarray, dict[str, Any] | None]:
    """An encoded video's frames [T, H, W, 3] (RGB), at most `max_frames` of them, evenly spaced, and their metadata
    as the processor reads it (the frames kept are the video: their rate is what spans the file's duration; None
    where the file gives no rate). Raises ValueError naming `name` where it does not decode or is too large."""
    try:
        import av
    except ImportError:
        raise ValueError(f"{name}: decoding a video file needs av (pip install 'pagedformers[video]')") from None
    what = source.name if isinstance(source, Path) else "given"
    try:
        with av.open(str(source) if isinstance(source, Path) else io.BytesIO(source)) as container:
            stream = container.streams.video[0]
            if stream.width * stream.height > MAX_VIDEO_PIXELS:
                raise ValueError(f"{name}: the {what} video's frames are {stream.width}x{stream.height}, more than "
                                 f"{MAX_VIDEO_PIXELS} pixels")
            frames, seen = _sampled_frames(container.decode(video=0), stream.frames, max_frames)
            rate = float(stream.average_rate or 0)
    except (av.FFmpegError, OSError, IndexError) as e:  # IndexError: no video stream
        raise ValueError(f"{name}: the {what} video does not decode ({type(e).__name__}: {e})") from None
    if not frames:
        raise ValueError(f"{name}: the {what} video has no frames")
    frames = np.stack([frames[i] for i in _evenly(len(frames), max_frames)])
    if not rate:
        return frames, None
    duration = seen / rate
    return frames, {"fps": len(frames) / duration, "duration": duration, "total_num_frames": len(frames),
                    "height": frames.shape[1], "width": frames.shape[2]}


def _sampled_frames(decoded: Any, total: int, max_frames: int) -> tuple[list[np.ndarray], int]:
    """Frames kept of a decoded stream of `total` frames (0: unknown), as RGB arrays, and how many it had. Where the
    count is unknown, every k-th frame is kept, k doubling whenever twice `max_frames` are held: memory stays
    bounded whatever the file holds."""
    keep = set(_evenly(total, max_frames)) if total else None
    frames, step, seen = [], 1, 0
    for i, frame in enumerate(decoded):
        seen = i + 1
        if (i not in keep) if keep is not None else i % step:
            continue
        frames.append(frame.to_ndarray(format="rgb24"))
        if keep is None and len(frames) >= 2 * max_frames:
            frames, step = frames[::2], step * 2
    return frames, total or seen


def _evenly(total: int, most: int) -> list[int]:
    return np.linspace(0, total - 1, min(total, most)).round().astype(int).tolist()
