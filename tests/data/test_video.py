from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from byol3d.cli import main
from byol3d.data.discovery import find_frames
from byol3d.errors import DataError

av = pytest.importorskip("av")

from byol3d.data.video import extract_frames, extract_video_folder  # noqa: E402


def _video(path, n=30, size=(64, 48)):
    """An MPEG-4 video whose frame i is grey level 8 * i."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(
                np.full((size[1], size[0], 3), 8 * i, np.uint8), format="rgb24"
            )
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_every_nth_frame_is_written_in_time_order(tmp_path):
    video = _video(tmp_path / "v.mp4")
    paths = extract_frames(video, tmp_path / "frames", every=10, ext="png")
    assert [p.name for p in paths] == ["frame_000000.png", "frame_000010.png", "frame_000020.png"]
    means = [np.asarray(Image.open(p)).mean() for p in paths]
    assert np.allclose(means, [0, 80, 160], atol=4)  # lossy codec: close, not exact
    assert Image.open(paths[0]).size == (64, 48)
    assert len(extract_frames(video, tmp_path / "two", every=1, max_frames=2)) == 2


def test_a_folder_of_videos_becomes_a_folder_of_frames_byol3d_finds(tmp_path, capsys):
    _video(tmp_path / "videos" / "case1.mp4", n=12)
    _video(tmp_path / "videos" / "more" / "case2.avi", n=6)
    counts = extract_video_folder(tmp_path / "videos", tmp_path / "frames", every=5)
    assert list(counts.values()) == [3, 2]
    assert find_frames(tmp_path / "frames") == [
        str(tmp_path / "frames" / "case1" / f"frame_{i:06d}.jpg") for i in (0, 5, 10)
    ] + [str(tmp_path / "frames" / "more" / "case2" / f"frame_{i:06d}.jpg") for i in (0, 5)]
    code = main(["extract-frames", str(tmp_path / "videos"), str(tmp_path / "cli"), "--every", "6"])
    assert code == 0 and "wrote 3 frames of 2 video(s)" in capsys.readouterr().out


def test_unreadable_videos_and_bad_arguments_are_named(tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(DataError, match="broken.mp4"):
        extract_frames(bad, tmp_path / "out")
    with pytest.raises(ValueError, match="every"):
        extract_frames(bad, tmp_path / "out", every=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no videos"):
        extract_video_folder(tmp_path / "empty", tmp_path / "x")
    assert main(["extract-frames", str(bad), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.mp4" in err[0]
