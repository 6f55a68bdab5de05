"""Frames out of surgical videos: every N-th frame of .mp4/.avi/... files written as images.

byol3d trains on frames (:func:`byol3d.data.discovery.find_frames`), not on video files: decoding a
random frame of a compressed video at every access means seeking to a key frame and decoding
forward, which costs far more than reading a JPEG. So videos are sampled once, up front:

    byol3d extract-frames /data/videos /data/frames --every 25     # 1 frame a second at 25 fps
    byol3d pretrain configs/endoscopy_resnet50.yaml data.root=/data/frames

Decoding uses PyAV (``pip install av``, or ``pip install byol3d[video]``), whose wheels
bundle FFmpeg's libraries: H.264, HEVC, MPEG-4 and the other common codecs decode without
system codecs. One sub-folder per video, ``OUT/<video stem>/frame_<index>.<ext>`` where
``index`` is the frame's number in the video (0-based, zero-padded to 6 digits), so the
file names sort in time order and tell where each frame came from.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from byol3d.data.discovery import VIDEO_SUFFIXES
from byol3d.errors import DataError


def _av():
    try:
        import av
    except ImportError:
        raise DataError(
            "reading videos needs PyAV (bundles FFmpeg): pip install av; or extract frames "
            "with ffmpeg itself, e.g. ffmpeg -i v.mp4 -vf select='not(mod(n\\,25))' -vsync vfr "
            "frames/v/%06d.jpg"
        ) from None
    return av


def find_videos(root: str | os.PathLike) -> list[Path]:
    """Video files (:data:`byol3d.data.discovery.VIDEO_SUFFIXES`) under ``root``, recursively, sorted;
    ``root`` itself when it is a video file."""
    path = Path(root).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"video path {root} does not exist")
    videos = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.name.lower().endswith(VIDEO_SUFFIXES)
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not videos:
        raise DataError(f"no videos ({'/'.join(VIDEO_SUFFIXES)}) under {root}")
    return videos


def extract_frames(
    video: str | os.PathLike,
    out_dir: str | os.PathLike,
    every: int = 25,
    ext: str = "jpg",
    max_frames: int | None = None,
    quality: int = 95,
) -> list[Path]:
    """Write frames 0, ``every``, 2 x ``every``, ... of ``video`` into ``out_dir``.

    Args:
        video: a video file FFmpeg can decode (mp4, avi, mov, mkv, ...).
        out_dir: folder for ``frame_<index>.<ext>`` files (created).
        every: keep one frame in ``every`` (25 at 25 fps: one a second, as Cholec80
            phase-recognition work samples).
        ext: ``"jpg"`` (small; JPEG ``quality``) or ``"png"`` (lossless, ~10x larger).
        max_frames: stop after writing this many (None: the whole video).
        quality: JPEG quality, 1-100.

    Returns:
        The written paths, in time order.

    Raises:
        DataError: a video that cannot be opened or decoded (named), or PyAV missing.
        ValueError: a bad ``every``, ``ext``, ``max_frames`` or ``quality``.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    if ext not in ("jpg", "png"):
        raise ValueError(f"ext must be 'jpg' or 'png', got {ext!r}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must lie in [1, 100], got {quality!r}")
    av = _av()
    out = Path(out_dir)
    written: list[Path] = []
    try:
        with av.open(str(video)) as container:
            if not container.streams.video:
                raise DataError(f"{video} holds no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame-threaded decoding
            for index, frame in enumerate(container.decode(stream)):
                if index % every:
                    continue
                rgb: np.ndarray = frame.to_ndarray(format="rgb24")
                path = out / f"frame_{index:06d}.{ext}"
                if not written:
                    out.mkdir(parents=True, exist_ok=True)
                options = {"quality": quality} if ext == "jpg" else {}
                Image.fromarray(rgb).save(path, **options)
                written.append(path)
                if max_frames is not None and len(written) >= max_frames:
                    break
    except DataError:
        raise
    except (av.error.FFmpegError, OSError) as err:  # unreadable, truncated, no such file
        raise DataError(f"cannot decode video {video}: {err}") from err
    if not written:
        raise DataError(f"video {video} has no decodable frame")
    return written


def extract_video_folder(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    every: int = 25,
    ext: str = "jpg",
    max_frames: int | None = None,
) -> dict[Path, int]:
    """:func:`extract_frames` for each video under ``src`` into ``out_dir/<relative path>/<stem>/``.

    Returns:
        ``{video path: number of frames written}``, in sorted video order.
    """
    src_path = Path(src).expanduser()
    counts: dict[Path, int] = {}
    for video in find_videos(src_path):
        rel = video.relative_to(src_path).parent if src_path.is_dir() else Path()
        stem = video.name[: -len(video.suffix)] if video.suffix else video.name
        target = Path(out_dir) / rel / stem
        counts[video] = len(
            extract_frames(video, target, every=every, ext=ext, max_frames=max_frames)
        )
    return counts
