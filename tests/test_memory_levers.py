"""The memory levers of a run (issue 8), each a switch that changes memory and nothing that is learned: selective
chunked loss, per-component gradient checkpointing, activation offload, 8-bit / paged AdamW, frozen weights in the
compute dtype, unused SigLIP weights never loaded."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from nvila_ft.adapters import AdapterPolicy, apply_policy, load_for_policy
from nvila_ft.adapters.merge import export_merged, merge_adapters
from nvila_ft.adapters.optim import parameter_groups
from nvila_ft.adapters.policy import ComponentPolicy
from nvila_ft.data.dataset import Collator
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model import losses
from nvila_ft.model.config import CheckpointError
from nvila_ft.model.modeling_nvila import NVILAForConditionalGeneration
from nvila_ft.model.presets import build_model
from nvila_ft.training.config import OPTIMIZERS, ConfigError, Precision, TrainerConfig
from nvila_ft.training.offload import offloaded_activations
from nvila_ft.training.trainer import NVILATrainer
from tests.tolerances import TINY_TRAIN_STEP, cross_entropy, dynamic_map_half_gap, reordered, scale_of, worst

# LoRA on the LLM (lm_head included), the projector fully trained, the vision tower's norms: every kind of trainable
POLICY = AdapterPolicy(
    vision_tower=ComponentPolicy(method="layernorm", lr_ratio=0.1),
    mm_projector=ComponentPolicy(method="full", weight_decay=0.01),
    llm=ComponentPolicy(method="lora", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]),
)


def image(seed: int, size=(60, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def conversations() -> list[list[dict]]:
    return [
        [{"role": "user", "content": [{"type": "image", "image": image(1)}, {"type": "text", "text": "Colour?"}]},
         {"role": "assistant", "content": "Red and blue, mostly."}],
        [{"role": "user", "content": "Just text."}, {"role": "assistant", "content": "Fine."}],
        [{"role": "user", "content": [{"type": "image", "image": image(2, (90, 50))}, {"type": "text", "text": "What?"}]},
         {"role": "assistant", "content": "Noise."}],
    ]


@pytest.fixture(scope="module")
def tiny():
    model = build_model("nvila-8b-tiny", seed=3).train()  # every parameter trainable, float32
    return model, NVILAProcessor(model.tokenizer, model.config)


def loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    batch = {k: v for k, v in batch.items() if k != "num_positions"}
    loss = model(**batch, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(expected, actual, atol=None, rtol=0.0):
    assert expected.keys() == actual.keys() and expected
    if atol is None:  # a training step's reductions reordered, at the scale of the largest gradient (tests/tolerances.py)
        atol = reordered(TINY_TRAIN_STEP, scale_of(expected))["atol"]
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=rtol, msg=name)


# ---------------------------------------------------------------------------------------------- selective loss
def _batches(processor):
    samples = [processor.process(c) for c in conversations()]
    padded = Collator(processor)(samples)
    no_answer = {k: v.clone() for k, v in padded.items()}
    no_answer["labels"][1] = -100  # a row without any supervised token
    packed = Collator(processor, max_tokens=max(s.length for s in samples) + 30)(samples)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 2
    return {"padded": padded, "row_without_answer": no_answer, "packed": packed}


@pytest.mark.parametrize("chunk_rows", [None, 4])
@pytest.mark.parametrize("case", ["padded", "row_without_answer", "packed", "num_items_in_batch", "time_tokens"])
def test_selective_loss_equals_full_cross_entropy_and_its_gradients(tiny, case, chunk_rows, monkeypatch):
    model, processor = tiny
    batches = _batches(processor)
    batch = batches["padded" if case in ("num_items_in_batch", "time_tokens") else case]
    kwargs = {}
    if case == "num_items_in_batch":  # the Trainer's count over a whole accumulated step
        kwargs["num_items_in_batch"] = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()) * 3)
    if case == "time_tokens":  # soft cross-entropy for two targets made time tokens
        supervised = (batch["labels"] != -100).nonzero()
        for row, column in supervised[[1, 4]].tolist():
            batch["labels"][row, column] = 101
        monkeypatch.setitem(model.config.raw, "time_token_ids", [100, 101, 102, 103])
        kwargs["num_items_in_batch"] = torch.tensor(40)
    if chunk_rows:
        monkeypatch.setattr(losses, "LOSS_CHUNK_ROWS", chunk_rows)  # several chunks of the supervised rows
    monkeypatch.setattr(model, "selective_loss", False)
    full_loss, full_grads = loss_and_grads(model, batch, **kwargs)
    monkeypatch.setattr(model, "selective_loss", True)
    output = model(**{k: v for k, v in batch.items() if k != "num_positions"}, **kwargs)
    assert output.logits is None  # no full-vocabulary logits in training
    loss, grads = loss_and_grads(model, batch, **kwargs)
    # the same hidden states; only the head (64 terms) and the cross-entropy (vocabulary, supervised rows) are reordered
    torch.testing.assert_close(loss, full_loss, **cross_entropy(64 + 2048, batch["labels"].numel(), full_loss))
    assert_same_grads(full_grads, grads)
    assert "llm.lm_head.weight" in grads and any(n.startswith("vision_tower") for n in grads)


def test_selective_loss_with_lora_on_lm_head_and_only_in_training(tiny_checkpoints):
    model = apply_policy(NVILAForConditionalGeneration.from_pretrained(tiny_checkpoints["nvila-8b-tiny"]), POLICY).train()
    processor = NVILAProcessor(model.tokenizer, model.config)
    batch = _batches(processor)["padded"]
    with torch.no_grad():  # B = 0: give the adapters a value so that their gradients are not trivially equal
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    full_loss, full_grads = loss_and_grads(model, batch)
    model.selective_loss = True
    loss, grads = loss_and_grads(model, batch)
    loss_tolerance = cross_entropy(64 + 2048, batch["labels"].numel(), full_loss)  # the head and the loss reordered
    torch.testing.assert_close(loss, full_loss, **loss_tolerance)
    assert any("lm_head.lora_A" in n for n in grads)
    assert_same_grads(full_grads, grads)
    model.eval()  # evaluation keeps the logits (and the same loss)
    with torch.no_grad():
        output = model(**{k: v for k, v in batch.items() if k != "num_positions"})
    assert output.logits is not None
    torch.testing.assert_close(output.loss, full_loss, **loss_tolerance)


def test_selective_loss_without_any_supervised_token_is_a_connected_zero(tiny):
    model, processor = tiny
    batch = dict(_batches(processor)["padded"])
    batch["labels"] = torch.full_like(batch["labels"], -100)
    model.selective_loss = True
    try:
        loss, grads = loss_and_grads(model, batch)
    finally:
        model.selective_loss = False
    assert loss.item() == 0.0 and "llm.lm_head.weight" in grads and all(g.abs().sum() == 0 for g in grads.values())


# ---------------------------------------------------------------------------------------------- checkpointing, offload
def _checkpoint_flags(model):
    vision = {layer.gradient_checkpointing for layer in model.vision_tower.transformer.encoder.layers}
    llm = {layer.gradient_checkpointing for layer in model.llm.model.layers}
    assert len(vision) == len(llm) == 1  # every layer of a component alike
    return tuple(name for name, flags in (("vision_tower", vision), ("llm", llm)) if flags == {True})


@pytest.mark.parametrize(
    ("components", "offload"),
    [((), True), (("llm",), False), (("vision_tower",), False), (("vision_tower", "llm"), False), (("vision_tower", "llm"), True)],
)
def test_checkpointing_per_component_and_offload_keep_the_gradients(components, offload):
    processor = None

    def run(components, offload):
        nonlocal processor
        model = build_model("nvila-8b-tiny", seed=9).train()
        processor = processor or NVILAProcessor(model.tokenizer, model.config)
        model.llm.model.embed_tokens.requires_grad_(False)  # frozen inputs: gradients must still reach the vision side
        if components:
            model.activation_checkpointing_enable(components=components)
        assert _checkpoint_flags(model) == model.checkpointed_components() == tuple(components)
        with offloaded_activations() if offload else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            batch = Collator(processor)([processor.process(c) for c in conversations()])
            return loss_and_grads(model, batch)

    plain_loss, plain = run((), False)
    loss, grads = run(components, offload)
    torch.testing.assert_close(loss, plain_loss, atol=0, rtol=0)  # the forward runs the same ops either way: exact
    assert_same_grads(plain, grads)  # recompute / offload reorder nothing by design; bounded as a reordered step


def test_offload_copies_activations_and_leaves_parameters():
    hooks = offloaded_activations()
    weight = torch.nn.Parameter(torch.randn(4, 3))
    assert hooks.pack_hook(weight) is weight and hooks.pack_hook(weight.t()).data_ptr() == weight.data_ptr()
    activation = torch.randn(2, 3)
    packed = hooks.pack_hook(activation)
    assert isinstance(packed, tuple) and packed[1].data_ptr() != activation.data_ptr()
    assert torch.equal(hooks.unpack_hook(packed), activation)


def test_checkpointing_and_optimizer_settings_are_checked():
    assert TrainerConfig(gradient_checkpointing=True).checkpointed_components() == ("vision_tower", "llm")
    assert TrainerConfig(gradient_checkpointing=False).checkpointed_components() == ()
    assert TrainerConfig(gradient_checkpointing=[]).checkpointed_components() == ()
    assert TrainerConfig(gradient_checkpointing=["llm", "vision_tower"]).checkpointed_components() == ("vision_tower", "llm")
    with pytest.raises(ConfigError) as error:
        TrainerConfig(gradient_checkpointing=["llm", "projector"]).check()
    assert str(error.value) == "trainer.gradient_checkpointing: 'projector' is not a component; use true, false or a list of vision_tower, llm"
    with pytest.raises(ConfigError) as error:
        TrainerConfig(optim="adamw_9bit").check()
    assert str(error.value) == f"trainer.optim = 'adamw_9bit'; use one of {', '.join(OPTIMIZERS)}"
    assert "\n" not in str(error.value)
    TrainerConfig(optim="paged_adamw_8bit", gradient_checkpointing=["llm"]).check()


# ---------------------------------------------------------------------------------------------- 8-bit / paged AdamW
@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_adamw_steps_with_the_component_groups(tiny_checkpoints, tmp_path, optim):
    # bitsandbytes >= 0.48 runs its optimizers on the CPU (paged ones fall back to ordinary memory there)
    import bitsandbytes as bnb

    model = apply_policy(NVILAForConditionalGeneration.from_pretrained(tiny_checkpoints["nvila-8b-tiny"]), POLICY).train()
    config = TrainerConfig(optim=optim, learning_rate=1e-2, weight_decay=0.1)
    trainer = NVILATrainer(model=model, policy=POLICY, args=config.training_arguments(tmp_path, Precision(), 0, has_eval=False))
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, bnb.optim.optimizer.Optimizer8bit) and optimizer.args.optim_bits == (32 if "32bit" in optim else 8)
    expected = parameter_groups(model, POLICY, 1e-2, 0.1)
    assert [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups] == [
        (g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in expected
    ]
    assert {g["name"] for g in expected} >= {"vision_tower/no_decay", "mm_projector/decay", "llm/decay"}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    processor = NVILAProcessor(model.tokenizer, model.config)
    loss_and_grads(model, Collator(processor)([processor.process(c) for c in conversations()]))
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert moved >= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0} and moved
    for param in (p for g in optimizer.param_groups for p in g["params"]):
        state = optimizer.state[param]
        large = param.numel() >= optimizer.args.min_8bit_size
        expected_dtype = torch.uint8 if large and "8bit" in optim else torch.float32
        assert state["state1"].dtype == state["state2"].dtype == expected_dtype
    assert any(p.numel() >= optimizer.args.min_8bit_size for p in before.values())  # the projector's weights


# ---------------------------------------------------------------------------------------------- weights in memory
@pytest.mark.parametrize("trainable_float32", [True, False])
def test_frozen_weights_stay_in_the_compute_dtype(tiny_checkpoints, tmp_path, trainable_float32):
    from nvila_ft.recipes.loading import load_model
    from nvila_ft.model.source import ModelSource

    precision = Precision(weights="bfloat16", autocast="bf16", trainable_float32=trainable_float32)
    model = load_model(ModelSource(path=str(tiny_checkpoints["nvila-8b-tiny"])), tmp_path, precision, policy=POLICY).model
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}  # never copied to float32, whatever the trainable tensors are kept in
    trainable = {p.dtype for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == ({torch.float32} if trainable_float32 else {torch.bfloat16})
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}  # PEFT's own choice


def test_unused_vision_weights_are_not_loaded_but_exported(tiny_checkpoints, tmp_path):
    source = tiny_checkpoints["nvila-8b-tiny"]
    built, loaded = build_model("nvila-8b-tiny", seed=0), NVILAForConditionalGeneration.from_pretrained(source)
    body = built.vision_tower.transformer
    unused = sum(p.numel() for p in body.encoder.layers[2].parameters()) + sum(p.numel() for p in body.post_layernorm.parameters())
    assert sum(p.numel() for p in built.parameters()) - sum(p.numel() for p in loaded.parameters()) == unused
    assert len(loaded.vision_tower.transformer.encoder.layers) == 2 and not hasattr(loaded.vision_tower.transformer, "post_layernorm")
    tiles = torch.randn(3, 3, built.config.tile_size, built.config.tile_size)
    with torch.no_grad():
        assert torch.equal(built.vision_tower(tiles), loaded.vision_tower(tiles))

    # a merged export holds every official tensor, the unused ones copied through unchanged
    policy = copy.deepcopy(POLICY)
    policy.vision_tower = ComponentPolicy(method="lora", r=4, alpha=8, dropout=0.0)
    model = apply_policy(load_for_policy(source, policy), policy)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    processor = NVILAProcessor.from_pretrained(source)
    export_merged(model, tmp_path / "merged", processor(conversations()[0]))
    original, exported = _tensors(source / "vision_tower"), _tensors(tmp_path / "merged" / "vision_tower")
    assert exported.keys() == original.keys()
    dropped = [k for k in original if re.match(r"vision_model\.(encoder\.layers\.2\.|post_layernorm\.)", k)]
    assert dropped and all(torch.equal(exported[k], original[k]) for k in dropped)
    assert not torch.equal(exported["vision_model.encoder.layers.0.mlp.fc1.weight"], original["vision_model.encoder.layers.0.mlp.fc1.weight"])
    NVILAForConditionalGeneration.from_pretrained(tmp_path / "merged")  # strict load of every key

    orphan = NVILAForConditionalGeneration.from_pretrained(source)
    orphan.name_or_path = str(tmp_path / "gone")
    with pytest.raises(CheckpointError, match="loaded without its unused weights"):
        orphan.save_pretrained(tmp_path / "orphan")


def _tensors(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


# ---------------------------------------------------------------------------------------------- levers together
def _train_two_steps(source, tmp_path, **levers):
    torch.manual_seed(0)  # the same LoRA initialisation in every run
    model = apply_policy(NVILAForConditionalGeneration.from_pretrained(source), POLICY).train()
    processor = NVILAProcessor(model.tokenizer, model.config)
    config = TrainerConfig(
        learning_rate=1e-2, max_steps=2, per_device_train_batch_size=2, warmup_ratio=0.0, logging_steps=1,
        optim=levers.get("optim", "adamw_torch"), gradient_checkpointing=levers.get("gradient_checkpointing", False),
    )
    config.check()
    model.selective_loss = levers.get("selective_loss", False)
    if config.checkpointed_components():
        model.activation_checkpointing_enable(components=config.checkpointed_components())
    trainer = NVILATrainer(
        model=model, policy=POLICY, args=config.training_arguments(tmp_path, Precision(), 0, has_eval=False),
        train_dataset=[processor.process(c) for c in conversations() * 2], data_collator=Collator(processor),
        offload_activations=levers.get("offload_activations", False),
    )
    trainer.train()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    merged = merge_adapters(model).state_dict()
    return trainable, {k: v.detach().clone() for k, v in merged.items()}


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
def test_levers_leave_trainable_names_and_merged_weights_unchanged(tiny_checkpoints, tmp_path):
    source = tiny_checkpoints["nvila-8b-tiny"]
    names, weights = _train_two_steps(source, tmp_path / "off")
    on = dict(selective_loss=True, gradient_checkpointing=True, offload_activations=True)
    names_on, weights_on = _train_two_steps(source, tmp_path / "on", **on)
    assert names_on == names and weights_on.keys() == weights.keys()
    # gradients agree to rho = 2 accumulation(step) of their scale; Adam's step 1 is +-lr whatever their size, step 2
    # moves by <= ~3 rho lr (m / sqrt(v), each off by rho); merging B A (r = 4 terms) rounds once more at |W|
    rho = reordered(TINY_TRAIN_STEP, 1.0)["atol"]
    for key in weights:
        atol = 2 * 1e-2 * 3 * rho + 2 * worst(4 + 1) * scale_of(weights[key])  # 2 steps at lr 1e-2, then the merge
        torch.testing.assert_close(weights_on[key], weights[key], atol=atol, rtol=0, msg=key)
    # 8-bit AdamW: the same parameters trained and merged, to nearly the same values (its moments are quantized)
    names_8bit, weights_8bit = _train_two_steps(source, tmp_path / "8bit", optim="paged_adamw_8bit", **on)
    assert names_8bit == names and weights_8bit.keys() == weights.keys()
    base = NVILAForConditionalGeneration.from_pretrained(source).state_dict()
    # m, v kept to bitsandbytes' dynamic maps at their block's absmax: m within q_m = 12.3% above 1% of it, v within
    # q_v = 22% above 1e-4 (g^2); Adam's first step uses the unquantized states, the second carries
    # beta1 (1 - beta1) / (1 - beta1^2) / sqrt(beta2 / (1 + beta2)) = 0.67 of m's error and half v's into the update
    bound = 0.67 * dynamic_map_half_gap(True, 1e-2) + 0.5 * dynamic_map_half_gap(False, 1e-4)  # 0.19
    for key in weights:
        update, update_8bit = weights[key] - base[key], weights_8bit[key] - base[key]
        assert (update_8bit - update).norm() <= bound * update.norm() + 2 * worst(4 + 1) * scale_of(base[key]), key
