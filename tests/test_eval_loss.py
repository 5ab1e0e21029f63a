"""eval_loss during training: the validation set's summed token losses over its supervised tokens, each record
counted once, whatever the evaluation batch size (and, tests/test_distributed.py, the number of processes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nvila_ft.data.dataset import Collator
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model.presets import build_model
from nvila_ft.model.tokenizer import IGNORE_INDEX
from nvila_ft.training.config import Precision, TrainerConfig
from nvila_ft.training.trainer import build_trainer
from tests.tolerances import TINY_FORWARD, accumulation

# Batched or alone, a record's loss runs the tiny model's chain of float32 reductions from the pixels to the loss
# (TINY_FORWARD: under 2^14 terms, counted in tests/tolerances.py) in other orders, the batch's shape setting the
# kernels' blocking: each result lies within accumulation(n) of the exact value, relative, so two differ by twice that.
RTOL = 2 * accumulation(TINY_FORWARD)


def image(seed: int, size=(60, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def conversation(question, answer, picture=None) -> list[dict]:
    content = [{"type": "image", "image": picture}, {"type": "text", "text": question}] if picture else question
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


# five records with answers of very different lengths, so a mean over records differs from the mean over tokens
RECORDS = [
    conversation("Colour?", "Red.", image(1)),
    conversation("Describe it.", "A wide field of noise in every colour, brighter at the top and darker below it.", image(2, (90, 50))),
    conversation("Just text.", "Fine."),
    conversation("What?", "Noise, mostly grey.", image(3)),
    conversation("Count to five.", "One, two, three, four, five."),
]


@pytest.fixture(scope="module")
def tiny():
    model = build_model("nvila-8b-tiny", seed=5).eval()
    processor = NVILAProcessor(model.tokenizer, model.config)
    return model, processor, [processor.process(c) for c in RECORDS]


def eval_loss(model, processor, samples, batch_size: int, tmp_path) -> float:
    config = TrainerConfig(per_device_eval_batch_size=batch_size)
    args = config.training_arguments(tmp_path / str(batch_size), Precision(), 0, has_eval=True)
    # trained on packed rows: evaluation batches are padded all the same
    packing = Collator(processor, max_tokens=max(s.length for s in samples) * 2)
    trainer = build_trainer(model, None, args, samples, samples, packing, eval_collator=Collator(processor))  # evaluates only: no policy
    return trainer.evaluate()["eval_loss"]


def by_hand(model, processor, samples) -> tuple[torch.Tensor, torch.Tensor]:
    """Each record's summed next-token cross-entropy and its supervised token count, one record at a time."""
    sums, counts = [], []
    with torch.no_grad():
        for sample in samples:
            batch = {k: v for k, v in Collator(processor)([sample]).items() if k not in ("labels", "num_positions")}
            logits = model(**batch, use_cache=False).logits[0, :-1].double()
            labels = torch.tensor(sample.labels[1:])
            sums.append(F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"))
            counts.append((labels != IGNORE_INDEX).sum())
    return torch.stack(sums), torch.stack(counts)


def test_eval_loss_is_the_token_weighted_loss_for_any_eval_batch_size(tiny, tmp_path):
    model, processor, samples = tiny
    sums, counts = by_hand(model, processor, samples)
    expected = float(sums.sum() / counts.sum())
    assert float((sums / counts).mean()) != pytest.approx(expected, rel=RTOL)  # a mean over records would fail
    for batch_size in (1, 2, 3, 5, 8):  # 3 leaves a short last batch, 8 is more than the records
        assert eval_loss(model, processor, samples, batch_size, tmp_path) == pytest.approx(expected, rel=RTOL)


def test_time_tokens_are_scored_with_the_training_loss(tiny, tmp_path):
    """A checkpoint's time tokens (<t0>, <t1>, ... in NVILA-Video) have soft targets in training; eval_loss is the
    training loss on the validation set, soft targets included."""
    model, processor, samples = tiny
    answers = [t for s in samples for t in s.labels if t != IGNORE_INDEX]
    time_tokens = sorted(set(answers))[:6]  # stand-ins for time tokens: ids that answers hold
    model.config.raw["time_token_ids"] = time_tokens
    try:
        hard = by_hand(model, processor, samples)
        with torch.no_grad():
            model.train()
            training = [model(**{k: v for k, v in Collator(processor)([s]).items() if k != "num_positions"}).loss for s in samples]
            model.eval()
        expected = float(sum(loss * count for loss, count in zip(training, hard[1])) / hard[1].sum())
        assert float(hard[0].sum() / hard[1].sum()) != pytest.approx(expected, rel=RTOL)  # soft and hard differ here
        assert eval_loss(model, processor, samples, 2, tmp_path) == pytest.approx(expected, rel=RTOL)
    finally:
        model.config.raw["time_token_ids"] = []
        model.eval()
