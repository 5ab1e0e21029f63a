"""The scale-then-compress knobs (`model.max_tiles`, `min_tiles`, `num_video_frames`, `s2_scales`,
`video_pool_sizes`): checked against the checkpoint, carried by the run's base config, used alike by the
processor, the model and the planner."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model.config import CheckpointError
from nvila_ft.model.modeling_nvila import NVILAForConditionalGeneration
from nvila_ft.model.presets import preset_config
from nvila_ft.model.settings import with_settings
from nvila_ft.model.source import ModelSource


@pytest.mark.parametrize(
    "preset, settings, reason",
    [
        ("nvila-8b", {"max_tiles": 4}, "needs at least 9 tiles"),
        ("nvila-8b", {"s2_scales": [448, 896]}, "the projector takes 3 scales"),
        ("nvila-8b", {"s2_scales": [448, 1344, 896]}, "scales must increase"),
        ("nvila-8b", {"s2_scales": [448, 900, 1344]}, "must be a multiple of the smallest"),
        ("nvila-lite-2b", {"s2_scales": [448, 896]}, "no Dynamic-S2"),
        ("nvila-lite-2b", {"min_tiles": 6, "max_tiles": 4}, "model.min_tiles = 6 is above model.max_tiles = 4"),
        ("nvila-lite-2b", {"num_video_frames": 0}, "a whole number >= 1"),
        ("nvila-lite-2b", {"video_pool_sizes": [[2, 1, 1]]}, "does not pool in time"),
        ("nvila-8b-video", {"num_video_frames": 255}, "divisible by"),
        ("nvila-8b-video", {"video_pool_sizes": [[8, 1, 1]], "num_video_frames": 12}, "divisible by 8"),
    ],
)
def test_values_the_architecture_cannot_take_are_refused_with_the_reason(preset, settings, reason):
    with pytest.raises(CheckpointError, match=reason):
        with_settings(preset_config(preset), **settings)


def test_settings_change_what_the_processor_and_layout_produce():
    from nvila_ft.model.tiny_tokenizer import TINY_TOKENIZER_DIR
    from nvila_ft.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    image = Image.fromarray(np.zeros((1000, 1400, 3), np.uint8))
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "x"}]
    base = NVILAProcessor(tokenizer, preset_config("nvila-lite-2b"))
    fewer = NVILAProcessor(tokenizer, with_settings(preset_config("nvila-lite-2b"), max_tiles=4))
    tiles = lambda p: sum(len(i.tiles) for i in p.process(chat).images)  # noqa: E731
    assert tiles(fewer) < tiles(base) and tiles(fewer) <= 4 + 1  # tiles plus the thumbnail
    assert fewer.measure(chat).positions == fewer.process(chat).length < base.process(chat).length
    video = with_settings(preset_config("nvila-8b-video"), num_video_frames=32, video_pool_sizes=[[4, 1, 1]])
    processor = NVILAProcessor(tokenizer, video)
    assert processor.num_video_frames == 32
    assert processor.layout.video_tokens(32) == (32 // 4) * 256  # 8 pooled frames of 16x16 tokens


def test_a_checkpoint_path_with_settings_gets_a_linked_base_that_model_and_exports_read(tiny_checkpoints, tmp_path):
    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    source = ModelSource(path=str(checkpoint), max_tiles=9, num_video_frames=4)
    source.check()
    base = source.checkpoint(tmp_path / "run" / "base")
    assert base != checkpoint and (base / "llm").is_symlink()  # weights linked, not copied
    config = json.loads((base / "config.json").read_text())
    assert (config["max_tiles"], config["num_video_frames"]) == (9, 4)
    original = json.loads((checkpoint / "config.json").read_text())
    assert {k: v for k, v in config.items() if k not in ("max_tiles", "num_video_frames")} == \
        {k: v for k, v in original.items() if k not in ("max_tiles", "num_video_frames")}
    model = NVILAForConditionalGeneration.from_pretrained(base)
    assert (model.config.max_tiles, model.config.num_video_frames) == (9, 4)
    exported = model.save_pretrained(tmp_path / "export")
    assert json.loads((exported / "config.json").read_text())["max_tiles"] == 9
    # the run's base is reused as it is; other settings on the same run are refused, not silently ignored
    assert ModelSource(path=str(checkpoint), max_tiles=9, num_video_frames=4).checkpoint(tmp_path / "run" / "base") == base
    with pytest.raises(CheckpointError, match="other model settings"):
        ModelSource(path=str(checkpoint), max_tiles=10).checkpoint(tmp_path / "run" / "base")
