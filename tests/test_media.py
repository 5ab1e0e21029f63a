"""Loading images and videos: RGB conversion, media-root containment, NVILA frame sampling, broken files."""

from __future__ import annotations

import io
import pathlib
import struct
import subprocess
import sys
import wave
import zlib

import av
import numpy as np
import pytest
from PIL import Image

from nvila_ft.data.media_base import MediaOptions
from nvila_ft.data.media import (
    MediaError,
    load_image,
    load_video,
    resolve_media_path,
    sample_frame_indices,
    write_video,
)

# Far apart in RGB so each survives H.264's yuv420p compression recognisably.
COLOURS = [
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
    (255, 255, 255), (0, 0, 0), (128, 128, 128), (255, 128, 0), (128, 0, 255), (0, 128, 64),
]


def solid_frames(count: int, size: tuple[int, int] = (32, 24)) -> list[Image.Image]:
    return [Image.new("RGB", size, COLOURS[i]) for i in range(count)]


def mean_colour(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)


def source_index(image: Image.Image) -> int:
    """Which entry of COLOURS a decoded frame shows, insisting the match is close."""
    distances = np.abs(np.asarray(COLOURS) - mean_colour(image)).max(axis=1)
    assert distances.min() < 12, f"frame colour {mean_colour(image)} matches no source frame"
    return int(distances.argmin())


def save_truncated(image: Image.Image, path: pathlib.Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format=path.suffix.lstrip(".").replace("jpg", "jpeg"))
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def noise_image(seed: int = 0, size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# --- sample_frame_indices -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "count, num, expected",
    [
        (10, 4, [0, 3, 6, 9]),
        (12, 4, [0, 4, 7, 11]),
        (3, 8, [0, 0, 1, 1, 1, 1, 2, 2]),
        (5, 8, [0, 1, 1, 2, 2, 3, 3, 4]),
        (1, 5, [0, 0, 0, 0, 0]),
        (7, 7, [0, 1, 2, 3, 4, 5, 6]),
        (100, 1, [0]),
    ],
)
def test_sample_frame_indices_known_values(count, num, expected):
    assert sample_frame_indices(count, num) == expected


@pytest.mark.parametrize("count, num", [(300, 8), (1000, 32), (17, 16), (2, 9), (64, 64), (4, 3)])
def test_sample_frame_indices_is_rounded_uniform_spacing(count, num):
    step = (count - 1) / (num - 1)
    assert sample_frame_indices(count, num) == [round(i * step) for i in range(num)]


@pytest.mark.parametrize("count, num", [(0, 4), (-1, 4), (5, 0)])
def test_sample_frame_indices_rejects_empty(count, num):
    with pytest.raises(ValueError):
        sample_frame_indices(count, num)


# --- load_image -----------------------------------------------------------------------------------


def test_rgba_loses_alpha_and_keeps_rgb_exactly(tmp_path):
    rgba = np.random.default_rng(1).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.mode == "RGB" and image.size == (30, 20)
    np.testing.assert_array_equal(np.asarray(image), rgba[..., :3])


def test_greyscale_and_palette_are_converted(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "l.png")), np.stack([grey] * 3, axis=-1))

    palette = [(10, 20, 30), (200, 100, 0), (0, 255, 90)]
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    p_image = Image.fromarray(indices, "P")
    p_image.putpalette([c for colour in palette for c in colour])
    p_image.save(tmp_path / "p.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "p.png")), np.asarray(palette)[indices])


def test_bytes_and_pil_sources(tmp_path):
    source = noise_image()
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    np.testing.assert_array_equal(np.asarray(load_image(buffer.getvalue())), np.asarray(source))

    rgba = source.convert("RGBA")
    image = load_image(rgba)
    assert image.mode == "RGB" and rgba.mode == "RGBA"  # the caller's image is left alone
    np.testing.assert_array_equal(np.asarray(image), np.asarray(source))


def test_relative_path_under_media_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    noise_image().save(tmp_path / "imgs" / "x.png")
    np.testing.assert_array_equal(np.asarray(load_image("imgs/x.png", tmp_path)), np.asarray(noise_image()))


@pytest.mark.parametrize("name", ["cut.png", "cut.jpg"])
def test_truncated_image_fails_at_load_naming_the_file(tmp_path, name):
    path = tmp_path / name
    save_truncated(noise_image(), path)
    with pytest.raises(MediaError, match="truncated") as error:
        load_image(path)
    assert str(path) in str(error.value)


def test_lazily_opened_truncated_pil_image_fails_at_load(tmp_path):
    save_truncated(noise_image(), tmp_path / "cut.png")
    with Image.open(tmp_path / "cut.png") as lazy, pytest.raises(MediaError, match="<PIL image>.*truncated"):
        load_image(lazy)


def test_text_file_named_jpg_is_refused(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not an image at all")
    with pytest.raises(MediaError, match="cannot decode image") as error:
        load_image(path)
    assert str(path) in str(error.value)


def test_missing_image_names_the_path(tmp_path):
    path = tmp_path / "nowhere.png"
    with pytest.raises(MediaError, match="not found") as error:
        load_image(path)
    assert str(path) in str(error.value)


def test_zero_size_image_is_refused():
    with pytest.raises(MediaError, match="<PIL image>.*zero size"):
        load_image(Image.new("RGB", (0, 0)))


def test_decompression_bomb_is_refused(tmp_path):
    # A PNG header claiming 30000x30000 pixels: PIL must refuse it before allocating anything.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with pytest.raises(MediaError, match="decompression bomb") as error:
        load_image(path)
    assert str(path) in str(error.value)


# --- resolve_media_path ---------------------------------------------------------------------------


@pytest.fixture
def media_root(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    noise_image().save(root / "a" / "b" / "in.png")
    noise_image().save(tmp_path / "outside.png")
    return root


def test_nested_relative_and_absolute_paths_inside_root_resolve(media_root):
    expected = (media_root / "a" / "b" / "in.png").resolve()
    assert resolve_media_path("a/b/in.png", media_root) == expected
    assert resolve_media_path("a/../a/b/in.png", media_root) == expected
    assert resolve_media_path(media_root / "a" / "b" / "in.png", media_root) == expected


def test_paths_escaping_the_root_are_refused(media_root, tmp_path):
    (media_root / "link.png").symlink_to(tmp_path / "outside.png")
    for path in ["../outside.png", tmp_path / "outside.png", "link.png", "a/../../outside.png"]:
        with pytest.raises(MediaError, match="escapes the media root"):
            resolve_media_path(path, media_root)
    with pytest.raises(MediaError, match="media root"):
        load_image("link.png", media_root)


def test_missing_path_and_no_root(media_root, tmp_path):
    # the message shows where it looked and under which root, so a wrong media root is obvious
    with pytest.raises(MediaError) as error:
        resolve_media_path("a/missing.png", media_root)
    resolved = media_root.resolve() / "a" / "missing.png"
    assert str(error.value) == f"a/missing.png: not found (looked for {resolved} under the media root {media_root.resolve()})"
    assert resolve_media_path(tmp_path / "outside.png", None) == tmp_path / "outside.png"


# --- images of more than 8 bits -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_keeps_its_grey_levels(tmp_path, suffix):
    # a 12-bit-range ramp as a CT or X-ray exporter writes it: Pillow's own RGB conversion clips it to white
    ramp = np.linspace(812, 3921, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / f"scan{suffix}"
    Image.fromarray(ramp).save(path)
    assert len(np.unique(np.asarray(Image.open(path).convert("RGB")))) < 20  # what nvila-ft used to do
    image = load_image(path)
    pixels = np.asarray(image)
    assert image.mode == "RGB" and (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert len(np.unique(pixels[..., 0])) > 200
    expected = np.round((ramp.astype(np.float64) - 812) / (3921 - 812) * 255).astype(np.uint8)
    np.testing.assert_array_equal(pixels[..., 0], expected)  # its own range -> 0..255, order kept
    assert "its own range" in image.info["note"]


def test_16_bit_grey_with_a_window_and_float_tiff(tmp_path):
    values = np.array([[0, 1000, 2000, 3000]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(values).save(tmp_path / "w.png")
    image = load_image(tmp_path / "w.png", options=MediaOptions(intensity_window=[1000, 2000]))
    assert np.asarray(image)[0, :, 0].tolist() == [0, 0, 255, 255]
    assert "window [1000, 2000]" in image.info["note"]
    floats = np.linspace(-1.5, 2.5, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(floats).save(tmp_path / "f.tif")
    pixels = np.asarray(load_image(tmp_path / "f.tif"))[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255 and len(np.unique(pixels)) > 200
    flat = np.full((8, 8), 700, dtype=np.uint16)
    Image.fromarray(flat).save(tmp_path / "flat.png")
    assert np.asarray(load_image(tmp_path / "flat.png")).max() == 0  # no range: black, not a division by zero


def test_8_bit_images_are_not_rescaled(tmp_path):
    grey = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) + 100)
    grey.save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    assert "rescaled" not in image.info
    assert np.asarray(image)[..., 0].tolist() == np.asarray(grey).tolist()


# --- load_video -----------------------------------------------------------------------------------


@pytest.fixture
def video12(tmp_path):
    return write_video(solid_frames(12), tmp_path / "colours.mp4")


def test_video_file_returns_sampled_frames_in_order(video12):
    frames = load_video(video12, 4)
    assert [f.mode for f in frames] == ["RGB"] * 4 and {f.size for f in frames} == {(32, 24)}
    assert [source_index(f) for f in frames] == [0, 4, 7, 11]


def test_short_video_repeats_frames(tmp_path):
    path = write_video(solid_frames(5), tmp_path / "short.mp4")
    assert [source_index(f) for f in load_video(path, 8)] == [0, 1, 1, 2, 2, 3, 3, 4]
    assert [source_index(f) for f in load_video(path, 1)] == [0]


def test_video_under_media_root(video12, tmp_path):
    assert len(load_video("colours.mp4", 3, media_root=tmp_path)) == 3
    with pytest.raises(MediaError, match="escapes the media root"):
        load_video("../colours.mp4", 3, media_root=tmp_path / "sub")


def test_frame_directory_uses_plain_sorted_order(tmp_path):
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    # sorted() puts frame_10 between frame_1 and frame_2, exactly as the official glob + sorted does.
    for name, colour in [("frame_2.png", 0), ("frame_10.png", 1), ("frame_1.png", 2), ("frame_3.png", 3)]:
        Image.new("RGB", (8, 8), COLOURS[colour]).save(frames_dir / name)
    (frames_dir / ".DS_Store").write_bytes(b"junk")
    frames = load_video(frames_dir, 4)
    assert [source_index(f) for f in frames] == [2, 1, 0, 3]


def test_corrupt_frame_in_directory_names_that_frame(tmp_path):
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    Image.new("RGB", (8, 8)).save(frames_dir / "0.png")
    save_truncated(noise_image(), frames_dir / "1.png")
    with pytest.raises(MediaError) as error:
        load_video(frames_dir, 2)
    assert str(frames_dir / "1.png") in str(error.value)


def test_frame_lists(tmp_path):
    images = solid_frames(3, (8, 8))
    assert [source_index(f) for f in load_video(images, 5)] == [0, 0, 1, 2, 2]
    paths = []
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    assert [source_index(f) for f in load_video(tuple(paths), 2)] == [0, 2]
    encoded = [(tmp_path / "1.png").read_bytes()]
    assert [source_index(f) for f in load_video(encoded, 2)] == [1, 1]


def test_empty_sources_are_refused(tmp_path):
    with pytest.raises(MediaError, match="<frames list>"):
        load_video([], 4)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden.png").write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        load_video(tmp_path / "empty", 4)
    with pytest.raises(MediaError, match="not found"):
        load_video(tmp_path / "missing.mp4", 4)


def test_random_bytes_video_is_refused(tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError, match="cannot open as a video") as error:
        load_video(path, 4)
    assert str(path) in str(error.value)


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(8000)
        audio.writeframes(np.zeros(800, dtype=np.int16).tobytes())
    with pytest.raises(MediaError, match="no decodable video stream"):
        load_video(path, 4)


def test_truncated_video(video12, tmp_path):
    data = video12.read_bytes()
    # write_video puts the mp4 index (moov) at the end, so cutting the file in half loses it.
    half = tmp_path / "half.mp4"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="cannot open as a video") as error:
        load_video(half, 4)
    assert str(half) in str(error.value)

    # Wherever the cut falls, the outcome is a MediaError or a short-enough list of RGB frames, and the same
    # outcome every time.
    for cut in range(1, len(data), max(1, len(data) // 40)):
        path = tmp_path / f"cut{cut}.mp4"
        path.write_bytes(data[:cut])
        outcomes = []
        for _ in range(2):
            try:
                frames = load_video(path, 4)
            except MediaError as e:
                outcomes.append(str(e))
            else:
                assert len(frames) <= 4 and all(f.mode == "RGB" for f in frames)
                outcomes.append([tuple(mean_colour(f).round(1)) for f in frames])
        assert outcomes[0] == outcomes[1]


def test_corrupt_middle_of_video_still_yields_frames(tmp_path, caplog):
    path = write_video([noise_image(i) for i in range(24)], tmp_path / "noise.mp4")
    data = bytearray(path.read_bytes())
    # Garble the middle of the media data, leaving the header, the first frames and the index intact.
    start = data.index(b"mdat") + 4
    size = int.from_bytes(data[start - 8 : start - 4], "big") - 8
    middle = start + size // 2
    data[middle : middle + size // 20] = np.random.default_rng(0).bytes(size // 20)
    path.write_bytes(data)
    # Frames that fail to decode are skipped (with a warning) and not counted, so sampling still fills up.
    frames = load_video(path, 8)
    assert len(frames) == 8 and all(f.mode == "RGB" and f.size == (64, 48) for f in frames)
    assert all(str(path) in record.getMessage() for record in caplog.records)


# --- write_video ----------------------------------------------------------------------------------


def test_write_video_round_trip(tmp_path):
    frames = solid_frames(6, (33, 25))  # odd sizes are padded to even for yuv420p
    frames[2] = np.asarray(frames[2])  # arrays are accepted as well
    path = write_video(frames, tmp_path / "out.mp4", fps=4)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.format.name) == ("h264", "yuv420p")
        decoded = [frame.to_image() for frame in container.decode(video=0)]
    assert len(decoded) == 6 and decoded[0].size == (34, 26)
    assert [source_index(f) for f in decoded] == list(range(6))


def test_importing_media_does_not_import_pyav():
    code = "import sys, nvila_ft.data.media; assert 'av' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).resolve().parents[1])
