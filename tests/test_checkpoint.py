"""Official checkpoint layout in and out: strict loading, identical round trips, atomic writes, clear errors."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model import checkpoint as checkpoint_module
from nvila_ft.model.config import CheckpointError
from nvila_ft.model.modeling_nvila import NVILAForConditionalGeneration
from nvila_ft.model.presets import build_model, save_preset_checkpoint


def image_batch(processor: NVILAProcessor):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 80, 3), dtype=np.uint8))
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A picture."},
    ]
    return processor(conversation)


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tensor_keys(path: Path) -> dict[str, tuple]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: (tuple(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype()) for k in handle.keys()}


@pytest.mark.parametrize("preset", ["nvila-8b-tiny", "nvila-lite-tiny", "nvila-video-tiny"])
def test_save_load_gives_identical_logits_and_weights(tiny_checkpoints, preset):
    built = build_model(preset, seed=0)
    loaded = NVILAForConditionalGeneration.from_pretrained(tiny_checkpoints[preset])
    built_state, loaded_state = built.state_dict(), loaded.state_dict()
    # loading leaves out what cannot affect the output: SigLIP's layer after the selected one (of 3), post_layernorm
    unused = {k for k in built_state if re.match(r"vision_tower\.model\.(vision_model\.)?(encoder\.layers\.2\.|post_layernorm\.)", k)}
    assert unused and loaded_state.keys() == built_state.keys() - unused
    assert all(torch.equal(built_state[k], loaded_state[k]) for k in loaded_state)
    batch = image_batch(NVILAProcessor.from_pretrained(tiny_checkpoints[preset]))
    with torch.no_grad():
        torch.testing.assert_close(built(**batch).logits, loaded(**batch).logits, rtol=0, atol=0)  # same bits, same ops: exact


@pytest.mark.parametrize("preset", ["nvila-8b-tiny", "nvila-lite-tiny"])
def test_resave_reproduces_every_file(tiny_checkpoints, preset, tmp_path):
    source = tiny_checkpoints[preset]
    NVILAForConditionalGeneration.from_pretrained(source).save_pretrained(tmp_path / "again")
    before, after = files_of(source), files_of(tmp_path / "again")
    assert before.keys() == after.keys()
    for name in before:
        if name == "config.json":
            old, new = json.loads(before[name]), json.loads(after[name])
            assert old.pop("_name_or_path") != new.pop("_name_or_path")
            assert old == new
        else:
            assert before[name] == after[name], name


def test_layout_matches_official_names(tiny_checkpoints):
    root = tiny_checkpoints["nvila-8b-tiny"]
    assert {p.name for p in root.iterdir()} == {"config.json", "llm", "vision_tower", "mm_projector"}
    assert {p.name for p in (root / "vision_tower").iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json"}
    assert {p.name for p in (root / "mm_projector").iterdir()} == {"config.json", "model.safetensors"}
    llm_files = {p.name for p in (root / "llm").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json", "vocab.json", "merges.txt"} <= llm_files
    vision = tensor_keys(root / "vision_tower" / "model.safetensors")
    assert all(k.startswith("vision_model.") for k in vision)
    assert vision["vision_model.embeddings.patch_embedding.weight"][0] == (32, 3, 8, 8)
    assert vision["vision_model.embeddings.position_embedding.weight"][0] == (16, 32)
    assert not any(".head." in k for k in vision)
    projector = tensor_keys(root / "mm_projector" / "model.safetensors")
    assert set(projector) == {f"layers.{i}.{p}" for i in (1, 2, 4) for p in ("weight", "bias")}
    assert projector["layers.2.weight"][0] == (64, 4 * 96)  # 2x2 windows of the 3-scale (3 x 32) features
    llm = tensor_keys(root / "llm" / "model.safetensors")
    assert llm["lm_head.weight"][0] == (2048, 64) and llm["model.embed_tokens.weight"][0] == (2048, 64)
    assert "model.layers.0.self_attn.q_proj.bias" in llm and "model.layers.0.self_attn.o_proj.bias" not in llm
    config = json.loads((root / "llm" / "config.json").read_text())
    assert config["vocab_size"] == 2048 and config["rope_theta"] == 1e6 and "rope_parameters" not in config


def test_tied_lm_head_is_not_written(tiny_checkpoints):
    keys = tensor_keys(tiny_checkpoints["nvila-lite-tiny"] / "llm" / "model.safetensors")
    assert "lm_head.weight" not in keys
    model = NVILAForConditionalGeneration.from_pretrained(tiny_checkpoints["nvila-lite-tiny"])
    assert model.llm.lm_head.weight.data_ptr() == model.llm.model.embed_tokens.weight.data_ptr()


def test_sharded_llm_round_trip(tmp_path):
    model = build_model("nvila-8b-tiny", seed=7)
    target = tmp_path / "sharded"
    checkpoint_module.save_checkpoint(model, target, max_shard_size="200KB")
    index = json.loads((target / "llm" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    assert index["metadata"]["total_size"] == sum(
        v.numel() * v.element_size() for k, v in model.llm.state_dict().items()
    )
    loaded = NVILAForConditionalGeneration.from_pretrained(target)
    built = model.state_dict()
    assert all(torch.equal(built[k], v) for k, v in loaded.state_dict().items())


def test_unknown_and_missing_optional_config_keys(tiny_checkpoints, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["nvila-8b-tiny"], root)
    config = json.loads((root / "config.json").read_text())
    for key in ("min_tiles", "max_tiles", "image_encoder", "video_encoder", "video_max_tiles"):
        config.pop(key, None)
    config["some_training_flag_we_do_not_know"] = {"x": 1}
    (root / "config.json").write_text(json.dumps(config))
    model = NVILAForConditionalGeneration.from_pretrained(root)
    assert (model.config.min_tiles, model.config.max_tiles) == (1, 12)
    assert model.config.image_encoder.kind == "image" and model.config.video_encoder.end_tokens == "\n"
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["some_training_flag_we_do_not_know"] == {"x": 1} and "min_tiles" not in saved


def test_encoder_given_as_json_string(tiny_checkpoints, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["nvila-video-tiny"], root)
    config = json.loads((root / "config.json").read_text())
    config["video_encoder"] = json.dumps({"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[4, 1, 1]]})
    (root / "config.json").write_text(json.dumps(config))
    model = NVILAForConditionalGeneration.from_pretrained(root)
    assert model.config.video_encoder.kind == "tsp_video" and model.config.video_encoder.pool_sizes == ((4, 1, 1),)


def _break(root: Path, action) -> Path:
    action(root)
    return root


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: (r / "config.json").unlink(), "not an NVILA checkpoint"),
        (lambda r: shutil.rmtree(r / "mm_projector"), "mm_projector/config.json"),
        (lambda r: (r / "config.json").write_text("{not json"), "invalid JSON"),
        (lambda r: (r / "config.json").write_text(json.dumps({"model_type": "nvila", "auto_map": {}})), "-hf"),
        (
            lambda r: (r / "mm_projector" / "config.json").write_text(json.dumps({"mm_projector_type": "perceiver"})),
            "mm_projector_type",
        ),
    ],
)
def test_not_a_checkpoint_errors_name_the_problem(tiny_checkpoints, tmp_path, damage, message):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["nvila-8b-tiny"], root)
    damage(root)
    with pytest.raises(CheckpointError, match=message):
        NVILAForConditionalGeneration.from_pretrained(root)


def test_missing_weight_is_named(tiny_checkpoints, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["nvila-8b-tiny"], root)
    path = root / "mm_projector" / "model.safetensors"
    state = load_file(str(path))
    del state["layers.4.bias"]
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing keys: layers\.4\.bias"):
        NVILAForConditionalGeneration.from_pretrained(root)


def test_unexpected_llm_weight_is_named(tiny_checkpoints, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["nvila-8b-tiny"], root)
    path = root / "llm" / "model.safetensors"
    state = load_file(str(path))
    state["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.9.mlp.up_proj.weight"):
        NVILAForConditionalGeneration.from_pretrained(root)


def test_untied_checkpoint_without_lm_head_is_an_error(tiny_checkpoints, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["nvila-8b-tiny"], root)
    path = root / "llm" / "model.safetensors"
    state = load_file(str(path))
    del state["lm_head.weight"]
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        NVILAForConditionalGeneration.from_pretrained(root)


def test_pickle_weights_are_refused(tiny_checkpoints, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["nvila-8b-tiny"], root)
    (root / "vision_tower" / "model.safetensors").unlink()
    (root / "vision_tower" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="safetensors only"):
        NVILAForConditionalGeneration.from_pretrained(root)


def test_missing_directory():
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        NVILAForConditionalGeneration.from_pretrained("/nonexistent/dir/for/sure")


def test_interrupted_save_leaves_nothing(monkeypatch, tmp_path):
    model = build_model("nvila-8b-tiny")
    calls = {"n": 0}
    original = checkpoint_module.write_safetensors

    def failing(folder, state, max_shard_size="5GB"):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        original(folder, state, max_shard_size)

    monkeypatch.setattr(checkpoint_module, "write_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_target_needs_overwrite(tmp_path):
    model = build_model("nvila-8b-tiny")
    target = model.save_pretrained(tmp_path / "out")
    marker = (target / "config.json").read_bytes()
    with pytest.raises(FileExistsError):
        model.save_pretrained(target)
    other = build_model("nvila-8b-tiny", seed=3)
    other.save_pretrained(target, overwrite=True)
    assert (target / "config.json").read_bytes() == marker  # same config, new weights
    reloaded = NVILAForConditionalGeneration.from_pretrained(target)
    assert torch.equal(reloaded.mm_projector.layers[2].weight, other.mm_projector.layers[2].weight)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_bf16_load_and_checkpoint_dtype_export(tiny_checkpoints, tmp_path):
    model = NVILAForConditionalGeneration.from_pretrained(tiny_checkpoints["nvila-8b-tiny"], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    batch = image_batch(NVILAProcessor.from_pretrained(tiny_checkpoints["nvila-8b-tiny"]))
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == 2048 and torch.isfinite(logits.float()).all()
    model.save_pretrained(tmp_path / "fp32")  # checkpoint dtype (float32) by default
    assert {v for _, v in tensor_keys(tmp_path / "fp32" / "llm" / "model.safetensors").values()} == {"F32"}
    model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert {v for _, v in tensor_keys(tmp_path / "bf16" / "llm" / "model.safetensors").values()} == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "llm" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_tokenizer_files_are_copied_verbatim(tiny_checkpoints, tmp_path):
    from nvila_ft.model.tiny_tokenizer import TINY_TOKENIZER_DIR, TOKENIZER_FILES

    root = tiny_checkpoints["nvila-lite-tiny"]
    for name in TOKENIZER_FILES:
        assert (root / "llm" / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes()
    added = json.loads((root / "llm" / "added_tokens.json").read_text())
    assert "<image>" not in added and len(added) == 5  # runtime tokens never reach disk


def test_offline_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        NVILAForConditionalGeneration.from_pretrained("Efficient-Large-Model/NVILA-8B")


def test_preset_saves_are_deterministic(tmp_path):
    a = save_preset_checkpoint(tmp_path / "a", "nvila-video-tiny", seed=11)
    b = save_preset_checkpoint(tmp_path / "b", "nvila-video-tiny", seed=11)
    fa, fb = files_of(a), files_of(b)
    fa.pop("config.json"), fb.pop("config.json")
    assert fa == fb
    c = save_preset_checkpoint(tmp_path / "c", "nvila-video-tiny", seed=12)
    assert files_of(c)["llm/model.safetensors"] != fa["llm/model.safetensors"]
    assert os.listdir(tmp_path) == sorted(["a", "b", "c"]) or set(os.listdir(tmp_path)) == {"a", "b", "c"}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_every_component_file_has_the_dtype_its_configs_say(tiny_checkpoints, tmp_path, dtype):
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    codes = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
    model = NVILAForConditionalGeneration.from_pretrained(tiny_checkpoints["nvila-lite-tiny"], dtype=torch.bfloat16)
    root = model.save_pretrained(tmp_path / "out", dtype=dtype)
    expected = names[dtype or torch.float32]  # default: the checkpoint's own dtype, not the dtype it ran in
    top = json.loads((root / "config.json").read_text())
    assert top["model_dtype"] == f"torch.{expected}"
    for component in ("llm", "vision_tower", "mm_projector"):
        config = json.loads((root / component / "config.json").read_text())
        assert config["torch_dtype"] == expected and top[f"{component}_cfg"]["torch_dtype"] == expected, component
        stored = {code for _, code in tensor_keys(root / component / "model.safetensors").values()}
        assert stored == {codes[expected]}, component


def test_null_and_unknown_top_level_keys_survive_a_save(tiny_checkpoints, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["nvila-8b-tiny"], root)
    written = json.loads((root / "config.json").read_text())
    written.update({"chat_template": None, "resume_path": None, "mm_projector_lr": None, "a_future_key": None,
                    "soft_ce_std": 1.0, "nested_unknown": {"x": None}})
    (root / "config.json").write_text(json.dumps(written))  # the expectation: exactly what is on disk now
    NVILAForConditionalGeneration.from_pretrained(root).save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved.pop("_name_or_path") == str(tmp_path / "out")
    written.pop("_name_or_path")
    assert saved == written


def test_overwrite_keeps_the_old_target_until_the_new_one_is_complete(monkeypatch, tmp_path):
    old = build_model("nvila-8b-tiny")
    target = old.save_pretrained(tmp_path / "out")
    before = files_of(target)
    calls = {"n": 0}
    original = checkpoint_module.write_safetensors

    def failing(folder, state, max_shard_size="5GB"):
        calls["n"] += 1
        if calls["n"] == 3:  # the last component: the new checkpoint is almost written
            raise OSError("disk full")
        original(folder, state, max_shard_size)

    monkeypatch.setattr(checkpoint_module, "write_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        build_model("nvila-8b-tiny", seed=5).save_pretrained(target, overwrite=True)
    assert files_of(target) == before  # every byte of the old checkpoint is still there
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # and no staging folder is left behind


def test_a_directory_another_process_wrote_meanwhile_is_kept(tmp_path):
    """Two processes of a launch build the run's base at once: the one that finishes second must not move the first
    one's directory aside (the first may already be reading it); it gives up with FileExistsError instead."""
    from nvila_ft.atomic import atomic_directory

    target = tmp_path / "base"
    with pytest.raises(FileExistsError, match="another process"):
        with atomic_directory(target) as staging:
            (staging / "mine.txt").write_text("second")
            target.mkdir()  # the other process finishes first
            (target / "theirs.txt").write_text("first")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no staging or backup folder left
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    with atomic_directory(target, overwrite=True) as staging:  # asked to replace: it does
        (staging / "mine.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["mine.txt"]


def test_a_base_built_by_two_processes_at_once_is_the_first_ones(tmp_path, monkeypatch):
    """ModelSource.checkpoint: when another process's base appears while this one writes its own, the other's is used."""
    from nvila_ft.model import source as source_module

    model = source_module.ModelSource(preset="nvila-8b-tiny", pretrained=True)
    target = tmp_path / "run" / "base"
    real = source_module.shutil.copytree

    def copy_then_race(src, dst, *args, **kwargs):
        result = real(src, dst, *args, **kwargs)
        if Path(dst).name.startswith(".base.tmp") and not target.exists():
            real(src, target)  # the other process's complete copy lands first
            (target / "winner").write_text("")
        return result

    monkeypatch.setattr(source_module.shutil, "copytree", copy_then_race)
    assert model.checkpoint(target) == target
    assert (target / "winner").is_file() and (target / "llm" / "config.json").is_file()
    assert [p.name for p in target.parent.iterdir()] == ["base"]
