"""Sequence packing: which samples go together, packed rows equal to padded batches, no attention across samples,
and the import graph the media-layout redesign promises."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nvila_ft.data.dataset import Collator
from nvila_ft.data.packing import LengthGroupedSampler, PackedBatchSampler, PackingError, pack_first_fit_decreasing
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model.presets import build_model
from tests.tolerances import TINY_FORWARD, TINY_TRAIN_STEP, reordered, scale_of

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- packs
def test_first_fit_decreasing_by_hand():
    # longest first: 7 -> pack A (room 3); 5 -> B (5); 4 -> B (1); 3 -> A (0); 2 -> C; 1 -> B (0)
    lengths = [3, 7, 1, 5, 2, 4]
    assert pack_first_fit_decreasing(lengths, 10) == [[0, 1], [2, 3, 5], [4]]
    assert pack_first_fit_decreasing([4, 4, 4], 4) == [[0], [1], [2]]
    with pytest.raises(PackingError, match=r"^b\.json\[1\]: 12 positions do not fit data.max_tokens = 10 \(and 1 more\); raise it$"):
        pack_first_fit_decreasing([3, 12, 11], 10, names=["a.json[0]", "b.json[1]", "c.json[2]"])


def test_packed_sampler_sees_every_sample_once_per_epoch():
    lengths = [int(v) for v in np.random.default_rng(0).integers(10, 300, 200)]
    sampler = PackedBatchSampler(lengths, 1000, rows=3, seed=3)
    assert all(sum(lengths[i] for i in pack) <= 1000 for pack in sampler.packs)
    assert len(sampler.packs) <= int(np.ceil(sum(lengths) / 1000)) + 2  # FFD packs tightly here
    first = list(sampler)
    assert len(first) == len(sampler) == -(-len(sampler.packs) // 3)
    assert sorted(i for batch in first for i in batch) == list(range(200))
    assert all(sum(lengths[i] for i in batch) <= 3 * 1000 for batch in first)
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(i for batch in second for i in batch) == list(range(200))
    assert list(PackedBatchSampler(lengths, 1000, rows=3, seed=3)) == first  # the same seed, the same order


def test_length_grouped_sampler_batches_one_modality_of_similar_length():
    rng = np.random.default_rng(1)
    lengths = [int(v) for v in rng.integers(10, 500, 120)]
    modalities = [("image", "video", "text")[i % 3] for i in range(120)]
    order = list(LengthGroupedSampler(lengths, modalities, batch_size=4, seed=0, group_batches=30))
    assert sorted(order) == list(range(120))
    batches = [order[k : k + 4] for k in range(0, 120, 4)]
    mixed = sum(len({modalities[i] for i in batch}) > 1 for batch in batches)
    assert mixed <= 2  # only where one modality's run ends inside a batch
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    assert spread < 0.25 * (max(lengths) - min(lengths))


# ---------------------------------------------------------------------------------------------- packed rows
def image(seed: int, size=(60, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def conversations(frames: int) -> list[list[dict]]:
    clip = [image(20 + t, (40, 30)) for t in range(frames)]
    return [
        [{"role": "user", "content": [{"type": "image", "image": image(1)}, {"type": "text", "text": "What is it?"}]},
         {"role": "assistant", "content": "A picture of noise."}],
        [{"role": "user", "content": "Just text, no media."}, {"role": "assistant", "content": "Fine, thanks."}],
        [{"role": "user", "content": [{"type": "video", "video": clip}, {"type": "text", "text": "What happens?"}]},
         {"role": "assistant", "content": "Colours change."}],
        [{"role": "user", "content": [{"type": "image", "image": image(2, (90, 50))}, {"type": "image", "image": image(3)},
                                       {"type": "text", "text": "Compare them."}]},
         {"role": "assistant", "content": "They differ."}],
    ]


@pytest.mark.parametrize("preset", ["nvila-8b-tiny", "nvila-lite-tiny", "nvila-video-tiny"])
def test_packed_row_gives_the_padded_loss_and_gradients(preset):
    model = build_model(preset, seed=0).train()
    processor = NVILAProcessor(model.tokenizer, model.config)
    samples = [processor.process(c) for c in conversations(model.config.num_video_frames)]
    padded = Collator(processor)(samples)
    packed = Collator(processor, max_tokens=sum(s.length for s in samples))(samples)  # all four in one row
    assert packed["input_ids"].shape == (1, sum(s.length for s in samples)) and "attention_mask" not in packed
    starts = [0, *np.cumsum([s.length for s in samples[:-1]])]
    assert all(packed["position_ids"][0, start] == 0 for start in starts)
    two_rows = Collator(processor, max_tokens=max(s.length for s in samples) + 60)(samples)  # rows, padded
    assert two_rows["input_ids"].shape[0] >= 2 and (two_rows["labels"] != -100).sum() == (packed["labels"] != -100).sum()

    def loss_and_grads(batch):
        model.zero_grad()
        batch = {k: v for k, v in batch.items() if k != "num_positions"}
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    padded_loss, padded_grads = loss_and_grads(padded)
    assert any("vision_tower" in n for n in padded_grads)
    # one row or two instead of four: other shapes, other order in every reduction of the step (tests/tolerances.py);
    # the loss (~log V) bounds every term of its own chain, the largest gradient every term of the backward's
    loss_tolerance = reordered(TINY_FORWARD, scale_of(padded_loss))
    grad_tolerance = reordered(TINY_TRAIN_STEP, scale_of(padded_grads))
    for batch in (packed, two_rows):  # the mean over every supervised token of the four samples (token-weighted)
        packed_loss, packed_grads = loss_and_grads(batch)
        torch.testing.assert_close(packed_loss, padded_loss, **loss_tolerance)
        assert padded_grads.keys() == packed_grads.keys()
        for name in padded_grads:
            torch.testing.assert_close(packed_grads[name], padded_grads[name], **grad_tolerance, msg=name)


@torch.no_grad()
def test_no_attention_crosses_samples_in_a_packed_row():
    model = build_model("nvila-8b-tiny", seed=0).train()  # training mode: no cache, as when packing
    processor = NVILAProcessor(model.tokenizer, model.config)
    first, second = conversations(8)[0], conversations(8)[1]
    changed = [second[0], {"role": "assistant", "content": "Something else entirely, and longer."}]
    rows = [Collator(processor, max_tokens=4096)([processor.process(first), processor.process(other)]) for other in (second, changed)]
    logits = [model(**{k: v for k, v in row.items() if k != "num_positions"}).logits[0] for row in rows]
    length = processor.process(first).length
    # the first sample never sees the second: its rows run the same ops on the same values (masked keys add exact zeros)
    torch.testing.assert_close(logits[0][:length], logits[1][:length], atol=0, rtol=0)
    alone = model(**{k: v for k, v in processor([first]).items()}).logits[0]
    torch.testing.assert_close(logits[0][:length], alone, **reordered(TINY_FORWARD, scale_of(alone)))  # other row length


def test_text_only_pack_runs_the_dummy_tile_in_distributed_training(monkeypatch):
    from nvila_ft.model import media_features

    model = build_model("nvila-8b-tiny", seed=0).train()
    processor = NVILAProcessor(model.tokenizer, model.config)
    monkeypatch.setattr(media_features, "_distributed_world_size", lambda: 2)
    packed = Collator(processor, max_tokens=4096)([processor.process(conversations(8)[1])] * 2)
    loss = model(**{k: v for k, v in packed.items() if k != "num_positions"}).loss
    loss.backward()
    tower = [p.grad for n, p in model.named_parameters() if n.startswith("vision_tower") and p.requires_grad]
    assert torch.isfinite(loss) and tower and all(g is not None and not g.any() for g in tower[:4])


# ---------------------------------------------------------------------------------------------- import graph
def _imports(package: str) -> dict[str, set[str]]:
    out = {}
    for file in (ROOT / "nvila_ft" / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
        out[str(file.relative_to(ROOT))] = names
    return out


def test_no_model_to_data_and_no_data_to_training_import():
    for file, names in _imports("model").items():
        assert not {n for n in names if n.startswith(("nvila_ft.data", "nvila_ft.training", "nvila_ft.adapters", "nvila_ft.commands"))}, file
    for file, names in _imports("data").items():
        assert not {n for n in names if n.startswith(("nvila_ft.training", "nvila_ft.adapters", "nvila_ft.commands"))}, file


def test_finetune_with_packing_and_a_sample_over_the_budget(tmp_path):
    from tests.test_cli import one_line_error, run_cli

    cache = tmp_path / "cache"
    common = ["task.train.num_records=40", "trainer.max_steps=3", "trainer.eval_steps=null", "trainer.save_steps=3",
              "eval.before_training=false", "eval.max_records=4"]
    result = run_cli(["finetune", *common, "data.packing=true", "data.max_tokens=300", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, cache)
    # demo_scan samples take 60-70 positions: four fit a row of 300
    assert "packing: 34 samples into 9 rows of up to 300 positions" in result.stdout and "8 rows per micro-batch" in result.stdout
    import json

    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 3
    failed = run_cli(["finetune", *common, "data.packing=true", "data.max_tokens=20", f"hydra.run.dir={tmp_path / 'r2'}"], tmp_path, cache, check=False)
    assert "positions do not fit data.max_tokens = 20 (and 33 more); raise it" in one_line_error(failed)
    grouped = run_cli(["finetune", *common, "data.group_by_length=true", f"hydra.run.dir={tmp_path / 'r3'}"], tmp_path, cache)
    assert json.loads((tmp_path / "r3" / "metrics.json").read_text())["steps"] == 3, grouped.stdout


def test_empty_share_is_the_unused_part_of_the_packs_budget():
    sampler = PackedBatchSampler([6, 4, 5], 10)  # packs [6, 4] and [5]: 15 of 20 positions used
    assert sampler.packs == [[0, 1], [2]] and sampler.empty_share == 0.25  # 5/20: exact in binary on any machine
    assert PackedBatchSampler([10, 10], 10).empty_share == 0.0


def test_a_last_micro_batch_with_fewer_packs_is_kept_and_counted():
    """Four packs in micro-batches of three: two micro-batches, the last with one pack (not dropped)."""
    sampler = PackedBatchSampler([10, 10, 10, 10], 10, rows=3, seed=0)
    assert len(sampler.packs) == 4 and len(sampler) == 2
    batches = list(sampler)
    assert [len(b) for b in batches] == [3, 1] and sorted(i for b in batches for i in b) == [0, 1, 2, 3]
