"""Model API behaviour: loss, padding sides, generation, gradient checkpointing, soft CE, bad batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model.losses import soft_cross_entropy
from nvila_ft.model.presets import build_model
from tests.tolerances import TINY_FORWARD, TINY_TRAIN_STEP, cross_entropy, reordered, scale_of


def image(seed: int, size=(60, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def question(seed: int, text: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "image", "image": image(seed)}, {"type": "text", "text": text}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


@pytest.fixture(scope="module")
def model_and_processor():
    model = build_model("nvila-8b-tiny", seed=0)
    return model, NVILAProcessor(model.tokenizer, model.config)


def test_loss_is_mean_cross_entropy_over_supervised_tokens(model_and_processor):
    model, processor = model_and_processor
    batch = processor([question(1, "Colour?", "Red and blue."), [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]])
    with torch.no_grad():
        output = model(**batch)
    labels = batch["labels"]  # aligned with the LLM sequence: the processor expanded every media item
    logits = output.logits[:, :-1].reshape(-1, output.logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    expected = F.cross_entropy(logits.float(), targets, ignore_index=-100)
    # the same logits: only the cross-entropy's logsumexp (vocabulary) and mean (supervised tokens) may be reordered
    torch.testing.assert_close(output.loss, expected, **cross_entropy(logits.shape[-1], int((targets != -100).sum()), expected))
    supervised = int((targets != -100).sum())
    with torch.no_grad():
        summed = model(**batch, num_items_in_batch=torch.tensor(supervised * 2)).loss
    torch.testing.assert_close(summed, expected / 2, **cross_entropy(logits.shape[-1], supervised + 1, expected / 2))


def test_right_and_left_padding_give_the_same_logits(model_and_processor):
    model, processor = model_and_processor
    conversations = [question(2, "What?", "A cat."), question(3, "Is this a long question about the picture?", "No.")]
    right, left = processor(conversations, padding_side="right"), processor(conversations, padding_side="left")
    with torch.no_grad():
        a, b = model(**right), model(**left)
        mask_a, mask_b = right["attention_mask"].bool(), left["attention_mask"].bool()
    # other positions, other batch shape: every reduction of the forward may be reordered (tests/tolerances.py)
    logits_tolerance = reordered(TINY_FORWARD, scale_of(a.logits))
    for i in range(2):
        torch.testing.assert_close(a.logits[i][mask_a[i]], b.logits[i][mask_b[i]], **logits_tolerance)
    # |d loss| <= 2 max|d logit| (logsumexp and the label's logit), plus the cross-entropy's own reordering
    loss_tolerance = 2 * logits_tolerance["atol"] + cross_entropy(a.logits.shape[-1], a.logits.shape[1], a.loss)["atol"]
    torch.testing.assert_close(a.loss, b.loss, atol=loss_tolerance, rtol=0)


def test_batched_left_padded_generation_equals_single(model_and_processor):
    model, processor = model_and_processor
    prompts = [question(4, "Describe the image."), question(5, "What is in the top left corner of this picture, exactly?")]
    batch = processor(prompts, add_generation_prompt=True)
    assert (batch["attention_mask"][:, -1] == 1).all() and (batch["attention_mask"][:, 0] == 0).any()
    together = model.generate(**batch, max_new_tokens=12)
    for i, prompt in enumerate(prompts):
        alone = model.generate(**processor(prompt, add_generation_prompt=True), max_new_tokens=12)
        assert together[i, : alone.shape[1]].tolist() == alone[0].tolist()


def test_generation_stops_at_im_end_and_samples(model_and_processor):
    model, processor = model_and_processor
    batch = processor(question(6, "Hello?"), add_generation_prompt=True)
    config = model.default_generation_config()
    assert config.eos_token_id == [model.tokenizer.convert_tokens_to_ids("<|im_end|>")] and not config.do_sample
    torch.manual_seed(0)
    first = model.generate(**batch, do_sample=True, top_k=0, temperature=5.0, max_new_tokens=20)
    torch.manual_seed(1)
    second = model.generate(**batch, do_sample=True, top_k=0, temperature=5.0, max_new_tokens=20)
    assert first.tolist() != second.tolist()
    greedy = model.generate(**batch, max_new_tokens=20)
    assert greedy.tolist() == model.generate(**batch, max_new_tokens=20).tolist()


def test_text_only_sample_beside_image_sample(model_and_processor):
    model, processor = model_and_processor
    batch = processor([[{"role": "user", "content": "Just text"}, {"role": "assistant", "content": "Fine."}], question(7, "Q", "A.")])
    assert batch["pixel_values"].shape[0] == 17
    output = model(**batch)
    assert torch.isfinite(output.loss)


def test_media_count_mismatch_is_an_error(model_and_processor):
    model, processor = model_and_processor
    batch = dict(processor(question(8, "Q", "A.")))
    without = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_grids")}
    with pytest.raises(ValueError, match=r"has 48 image placeholder positions but its images give 0 feature tokens"):
        model(**without)
    extra = dict(batch, pixel_values=torch.cat([batch["pixel_values"]] * 2), image_grids=torch.cat([batch["image_grids"]] * 2))
    with pytest.raises(ValueError, match=r"has 48 image placeholder positions but its images give 96 feature tokens"):
        model(**extra)


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing: bool):
        model = build_model("nvila-8b-tiny", seed=9)
        processor = NVILAProcessor(model.tokenizer, model.config)
        model.train()
        for p in model.llm.parameters():
            p.requires_grad_(False)  # frozen LLM: gradients must still reach the vision side through it
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        model(**processor(question(10, "Q", "An answer."))).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and any("vision_tower" in n for n in plain)
    tolerance = reordered(TINY_TRAIN_STEP, scale_of(plain))  # a step's reductions, at the gradients' scale
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], **tolerance)


def test_unused_vision_layers_are_skipped_and_reported(model_and_processor):
    model, _ = model_and_processor
    assert model.vision_tower.num_layers_used == 2  # select layer -2 of 3 layers
    unused = model.vision_tower.unused_parameter_names()
    assert unused and all("layers.2." in n or "post_layernorm" in n for n in unused)


def test_soft_cross_entropy_matches_manual_computation():
    torch.manual_seed(0)
    vocab, soft = 12, [6, 7, 8, 9]
    logits = torch.randn(1, 5, vocab)
    labels = torch.tensor([[-100, 3, 7, -100, 9]])
    loss = soft_cross_entropy(logits, labels, soft, std=1.0)
    targets = [(0, 3), (1, 7), (3, 9)]  # (position predicting, target)
    total = 0.0
    for position, target in targets:
        log_probs = torch.log_softmax(logits[0, position], -1)
        if target in soft:
            weights = torch.tensor([np.exp(-((target - s) ** 2) / 2) for s in soft])
            weights = weights / weights.sum()
            total += -(weights * log_probs[soft]).sum()
        else:
            total += -log_probs[target]
    torch.testing.assert_close(loss, total / 3, **reordered(vocab + len(soft) + 3, scale_of(loss)))  # logsumexp, soft weights, mean of 3


def test_time_tokens_switch_training_loss_to_soft_ce(model_and_processor):
    # one supervised target is a time token: training uses the soft (Gaussian over time tokens) loss, evaluation
    # the plain cross-entropy; both are recomputed here from the logits
    model, processor = model_and_processor
    time_tokens = [100, 101, 102, 103]
    batch = processor(question(11, "When?", "At the start."))
    supervised = (batch["labels"][0] != -100).nonzero().flatten()
    batch["labels"][0, supervised[1]] = 101
    model.config.raw["time_token_ids"] = time_tokens
    try:
        model.train()
        with torch.no_grad():
            training = model(**batch).loss
        model.eval()
        with torch.no_grad():
            evaluation = model(**batch).loss
            labels = batch["labels"]
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    finally:
        model.config.raw["time_token_ids"] = []
        model.eval()
    targets = labels[0, 1:]
    log_probs = torch.log_softmax(logits[0, :-1].float(), -1)
    kept = (targets != -100).nonzero().flatten()
    hard = -log_probs[kept, targets[kept]].mean()
    soft_terms = []
    for position in kept.tolist():
        target = int(targets[position])
        if target in time_tokens:
            weights = torch.tensor([np.exp(-((target - t) ** 2) / 2) for t in time_tokens], dtype=torch.float32)
            soft_terms.append(-(weights / weights.sum() * log_probs[position, time_tokens]).sum())
        else:
            soft_terms.append(-log_probs[position, target])
    soft = torch.stack(soft_terms).mean()
    # the same logits in training and evaluation: only the loss's own sums may be reordered (+ the 4 soft weights)
    tolerance = cross_entropy(logits.shape[-1] + len(time_tokens), len(kept), soft)
    assert abs(float(soft - hard)) > 10 * tolerance["atol"]  # 10x the tolerance below: the test tells which loss was used
    torch.testing.assert_close(training, soft, **tolerance)
    torch.testing.assert_close(evaluation, hard, **tolerance)

def test_right_padded_prompts_generate_like_left_padded(model_and_processor):
    model, processor = model_and_processor
    prompts = [question(4, "Describe the image."), question(5, "What is in the top left corner of this picture?")]
    left = processor(prompts, add_generation_prompt=True)
    right = processor(prompts, add_generation_prompt=True, padding_side="right")
    assert not right["attention_mask"][:, -1].all()
    assert model.generate(**right, max_new_tokens=8).tolist() == model.generate(**left, max_new_tokens=8).tolist()


def test_public_api_names_load_lazily():
    import subprocess
    import sys

    code = ("import sys, nvila_ft; assert 'torch' not in sys.modules; "
            "from nvila_ft import NVILAForConditionalGeneration, NVILAProcessor, AdapterPolicy, MediaLayout, apply_policy; "
            "print(NVILAForConditionalGeneration.__name__, NVILAProcessor.__name__, AdapterPolicy.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["NVILAForConditionalGeneration", "NVILAProcessor", "AdapterPolicy"]
