"""Frames of a video file, decoded with PyAV (FFmpeg): sampled uniformly, or chosen by index.

Only plain files are opened (no network, no FFmpeg protocols), and packets that fail to decode are skipped as
official NVILA skips bad frames. PyAV is imported lazily so that importing this module stays cheap.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from PIL import Image

from nvila_ft.data.media_base import MediaError, sample_frame_indices

if TYPE_CHECKING:
    import av

logger = logging.getLogger(__name__)

# Only plain files: no network, and no `concat:`/`subfile:` style protocols smuggled in through playlists.
_FFMPEG_OPTIONS = {"protocol_whitelist": "file"}


def decode_sampled_frames(path: pathlib.Path, num_frames: int) -> list[Image.Image]:
    """`num_frames` RGB frames at `sample_frame_indices` of the frames that decode; fewer when a sampled frame fails
    to convert (with a warning)."""
    import av

    # Containers often misreport their frame count, so count what actually decodes first, then decode
    # again converting only the sampled frames: memory stays at num_frames images, whatever the length.
    with _open_video(path) as container:
        frame_count = sum(1 for _ in _decode_frames(container, path))
    if frame_count == 0:
        raise MediaError(f"{path}: no decodable video frames")
    indices = sample_frame_indices(frame_count, num_frames)

    wanted = set(indices)
    images: dict[int, Image.Image] = {}
    with _open_video(path) as container:
        # The counting pass already warned about any damage.
        for position, frame in enumerate(_decode_frames(container, path, warn=False)):
            if position in wanted:
                try:
                    images[position] = frame.to_image().convert("RGB")
                except (av.FFmpegError, ValueError) as e:
                    logger.warning("%s: skipped frame %d that failed to convert (%s)", path, position, e)
            if position >= indices[-1]:
                break
    if len(images) < len(wanted):
        logger.warning("%s: got %d of %d sampled frames", path, len(images), len(wanted))
    return [images[i] for i in indices if i in images]


def decode_chosen_frames(path: pathlib.Path, frames: tuple[int, ...], label: str) -> list[Image.Image]:
    """The RGB frames at the 0-based decoding positions `frames`, in that order; decoding stops after the last one.
    `label` names the clip in the messages."""
    import av

    last, wanted, images = max(frames), set(frames), {}
    with _open_video(path) as container:
        # Decoding is sequential (seeking lands on key frames, not exact indices): stop after the last one needed.
        decoded = 0
        for position, frame in enumerate(_decode_frames(container, path)):
            decoded = position + 1
            if position in wanted:
                try:
                    images[position] = frame.to_image().convert("RGB")
                except (av.FFmpegError, ValueError) as e:
                    raise MediaError(f"{label}: frame {position} failed to convert ({e})") from e
            if position >= last:
                break
    if last not in images:
        raise MediaError(f"{label}: frame {last} asked for, the video has {decoded} decodable frames (0-{decoded - 1})",
                         kind="video_frames")
    return [images[i] for i in frames]


def _open_video(path: pathlib.Path) -> av.container.InputContainer:
    import av

    try:
        # An absolute path cannot be mistaken for an FFmpeg protocol prefix such as `concat:`.
        container = av.open(str(path.absolute()), options=_FFMPEG_OPTIONS)
    except (av.FFmpegError, OSError) as e:
        raise MediaError(f"{path}: cannot open as a video ({e})") from e
    if not container.streams.video or container.streams.video[0].codec_context is None:
        container.close()
        raise MediaError(f"{path}: has no decodable video stream")
    return container


def _decode_frames(
    container: av.container.InputContainer, path: pathlib.Path, warn: bool = True
) -> Iterator[av.VideoFrame]:
    """Decode the first video stream, skipping packets that fail (as official NVILA skips bad frames)."""
    import av

    log = logger.warning if warn else logger.debug
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError as e:
                log("%s: skipped a packet that failed to decode (%s)", path, e)
                continue
            yield from frames
    except av.FFmpegError as e:
        # The demuxer cannot go on (e.g. a truncated file): keep what decoded so far.
        log("%s: stopped reading at damaged data (%s)", path, e)
