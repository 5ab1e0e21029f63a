"""The planner's arithmetic against hand computations: what scales with the micro-batch, what checkpointing keeps,
what offloading removes, what ZeRO divides, how the quantiles and the allowances are taken. Meta models only
(no weights), a few seconds in all."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from nvila_ft.model.losses import LOSS_CHUNK_ROWS
from nvila_ft.model.presets import preset_config
from nvila_ft.training import planner
from nvila_ft.training.planner import Line, Plan, RunShape, SampleDemand, SequenceStats
from tests.test_planner import ROOT, preset_policy

SAMPLE = SampleDemand(64, 14, 3)


@pytest.fixture(scope="module")
def setup():
    config = preset_config("nvila-8b-tiny")
    policy = preset_policy(ROOT / "adapters" / "ln_vit_lora_llm.yaml")
    model = planner.meta_model(config, policy, torch.float32)
    return config, policy, model


def activations(setup, sample=SAMPLE, **shape) -> dict[tuple[str, str], int]:
    config, policy, model = setup
    plan = planner.plan(config, policy, sample, RunShape(weights_dtype=torch.float32, cuda=False, **shape), model=model)
    out: dict[tuple[str, str], int] = {}
    for line in plan.lines:
        out[line.component, line.item] = out.get((line.component, line.item), 0) + line.bytes
    return out


def test_activations_scale_with_the_micro_batch(setup):
    """Every row of a micro-batch keeps its own activations: two rows keep twice what one keeps, per component."""
    one, two = activations(setup), activations(setup, micro_batch=2)
    for key in (("vision_tower", "activations"), ("llm", "activations"), ("mm_projector", "activations")):
        assert one[key] > 0 and two[key] == 2 * one[key], key
    assert two["llm", "loss"] == pytest.approx(2 * one["llm", "loss"], abs=16)  # the scalar loss is not doubled


def test_checkpointing_keeps_each_layers_input_and_recomputes_one_layer(setup):
    """Checkpointed: every layer keeps only its input [rows, tokens, width] (float32 here), and one layer's
    activations come back during backward."""
    config, _, model = setup
    plain = activations(setup, micro_batch=2)
    checkpointed = activations(setup, micro_batch=2, checkpointing=("vision_tower", "llm"))
    llm_layers, vision_layers = config.llm["num_hidden_layers"], model.vision_tower.num_layers_used
    assert llm_layers > 1 and vision_layers > 1
    assert checkpointed["llm", "activations"] == llm_layers * 2 * SAMPLE.positions * config.llm_hidden_size * 4
    tiles, patches = 2 * SAMPLE.tiles, config.patches_per_side**2
    assert checkpointed["vision_tower", "activations"] == vision_layers * tiles * patches * config.vision_hidden_size * 4
    # the layer recomputed in backward: the larger of one LLM layer and one vision layer, as planned without checkpointing
    per_layer = max(plain["llm", "activations"] // llm_layers, plain["vision_tower", "activations"] // vision_layers)
    assert checkpointed["run", "activations"] == per_layer


@pytest.fixture(scope="module")
def setup16():
    config = preset_config("nvila-8b-tiny", torch.bfloat16)
    policy = preset_policy(ROOT / "adapters" / "ln_vit_lora_llm.yaml")
    return config, policy, planner.meta_model(config, policy, torch.bfloat16)


def working_set(setup, sample, dtype, **shape) -> int:
    config, policy, model = setup
    plan = planner.plan(config, policy, sample, RunShape(weights_dtype=dtype, cuda=False, **shape), model=model)
    return sum(line.bytes for line in plan.lines if line.item == "backward working set")


def test_selective_loss_takes_logits_a_chunk_at_a_time(setup, setup16):
    """Selective loss: the hidden rows of the supervised positions are kept (never more than there are positions);
    the logits exist for one chunk of LOSS_CHUNK_ROWS rows at a time, in 16 bits plus their float32 copy (bf16 run);
    a float32 run's full loss holds one float32 copy of every position's logits (`.float()` copies nothing)."""
    config, _, _ = setup16
    many = SampleDemand(3 * LOSS_CHUNK_ROWS, 1, 2 * LOSS_CHUNK_ROWS + 5)
    assert working_set(setup16, many, torch.bfloat16, selective_loss=True) == LOSS_CHUNK_ROWS * config.vocab_size * (2 + 4)
    few = SampleDemand(512, 1, 500)
    assert working_set(setup16, few, torch.bfloat16, selective_loss=True) == 500 * config.vocab_size * (2 + 4)
    assert working_set(setup16, SampleDemand(512, 1, 10), torch.bfloat16) == 512 * config.vocab_size * (2 + 4)
    # more supervised positions than positions (a record cut to model_max_length) count as the positions
    capped = activations(setup, SampleDemand(64, 1, 500), selective_loss=True)
    assert capped["llm", "loss"] == activations(setup, SampleDemand(64, 1, 64), selective_loss=True)["llm", "loss"]
    assert working_set(setup, SampleDemand(512, 1, 10), torch.float32) == 512 * config.vocab_size * 4  # every position's


def test_offloaded_activations_and_optimizer_leave_nothing_on_the_gpu(setup):
    offloaded = activations(setup, offload_activations=True, checkpointing=("llm",))
    assert offloaded["vision_tower", "activations"] == offloaded["llm", "activations"] == 0
    _, _, model = setup

    def state(**shape) -> dict[str, int]:
        return {l.item: l.bytes for l in planner.training_state_lines(model, RunShape(weights_dtype=torch.bfloat16, cuda=False, **shape))}

    on_gpu = state(zero_stage=2, world_size=2)
    assert on_gpu["optimizer step"] == on_gpu["gradients"] > 0  # the update's temporaries: about the gradients
    cpu = state(zero_stage=2, world_size=2, offload_optimizer=True)
    assert cpu["optimizer step"] == cpu["optimizer"] == 0


def test_trainable_tensors_in_16_bits_when_asked(setup):
    """precision.trainable_float32=false: every weight (trained or not) in bf16, gradients too; under ZeRO the
    trained tensors stay bf16 (DeepSpeed keeps the float32 master copies with the optimizer)."""
    config, policy, _ = setup
    model = planner.meta_model(config, policy, torch.bfloat16, lora_float32=False)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for shape in (RunShape(trainable_float32=False), RunShape(trainable_float32=True, zero_stage=1)):
        weights = sum(l.bytes for l in planner.weight_lines(model, policy, shape))
        assert weights == 2 * parameters, shape
    sixteen = {l.item: l.bytes for l in planner.training_state_lines(model, RunShape(trainable_float32=False))}
    assert sixteen["gradients"] == 2 * trainable
    mixed = planner.meta_model(config, policy, torch.bfloat16, lora_float32=True)
    weights = sum(l.bytes for l in planner.weight_lines(mixed, policy, RunShape()))
    assert weights == 2 * (parameters - trainable) + 4 * trainable
    full = {l.item: l.bytes for l in planner.training_state_lines(mixed, RunShape(weights_dtype=torch.float32))}
    assert full["gradients"] == 4 * trainable


def test_zero3_shards_the_weights_and_offload_moves_them(setup):
    config, policy, _ = setup
    model = planner.meta_model(config, policy, torch.bfloat16, lora_float32=False)
    total = 2 * sum(p.numel() for p in model.parameters())
    layer = max(sum(p.numel() for p in layer.parameters()) for layer in planner.component_layers(model, "llm"))

    def weights(**shape) -> dict[str, int]:
        lines = planner.weight_lines(model, policy, RunShape(trainable_float32=False, **shape))
        return {"components": sum(l.bytes for l in lines if "gathered" not in l.note),
                "gathered": sum(l.bytes for l in lines if "gathered" in l.note)}

    assert weights(zero_stage=2, world_size=4) == {"components": total, "gathered": 0}
    sharded = weights(zero_stage=3, world_size=4)
    assert sharded["gathered"] == 2 * layer * 2
    assert abs(sharded["components"] - total / 4) <= 3  # each of the three components rounded up
    assert weights(zero_stage=3, world_size=4, offload_params=True) == {"components": 0, "gathered": 2 * layer * 2}


def test_quantiles_are_nearest_rank_and_max_takes_each_field():
    samples = [SampleDemand(p, 0, 1) for p in range(1, 21)]  # 20 samples, positions 1..20
    stats = SequenceStats(samples[::-1], total=20)
    assert stats.p50.positions == 10 and stats.p95.positions == 19 and stats.quantile(1.0).positions == 20
    assert stats.quantile(0.0).positions == 1
    mixed = SequenceStats([SampleDemand(100, 2, 5), SampleDemand(40, 32, 30)], total=2)
    assert mixed.max == SampleDemand(100, 32, 30)  # a long text and a video with many frames


def test_allowances_are_a_share_of_the_tensors_and_allocated_leaves_them_out():
    lines = [Line("llm", "weights", 1000), Line("run", "optimizer", 300), Line("llm", "activations", 500),
             Line("run", "loss", 100), Line("run", "gradients", 200), Line("run", "optimizer step", 200)]
    shape = RunShape(cuda=False)
    tensors = Plan(list(lines), SAMPLE, shape).total
    assert tensors == 1000 + 300 + max(500 + 100, 200 + 200)
    assert Plan(list(lines), SAMPLE, replace(shape, gradient_accumulation=2)).total == 1000 + 300 + max(600 + 200, 400)
    slack = int(planner.ALLOCATOR_SLACK * tensors)
    with_cuda = Plan([*lines, Line("run", "CUDA context", planner.CUDA_CONTEXT_BYTES), Line("run", "allocator slack", slack)],
                     SAMPLE, RunShape())
    assert with_cuda.total == tensors + planner.CUDA_CONTEXT_BYTES + slack and with_cuda.allocated == tensors


def test_plan_adds_the_cuda_context_and_a_slack_of_the_tensor_bytes(setup):
    config, policy, model = setup
    shape = RunShape(weights_dtype=torch.float32)
    with_cuda = planner.plan(config, policy, SAMPLE, shape, model=model)
    without = planner.plan(config, policy, SAMPLE, replace(shape, cuda=False), model=model)
    items = with_cuda.by_item()
    assert items["CUDA context"] == planner.CUDA_CONTEXT_BYTES
    assert items["allocator slack"] == int(planner.ALLOCATOR_SLACK * without.total)  # of the tensors, not the context
    assert with_cuda.allocated == without.total


def test_fewer_micro_batch_rows_keep_the_global_batch(setup):
    config, policy, _ = setup
    shape = RunShape(micro_batch=4, gradient_accumulation=3)
    change = next(c for c in planner.changes(policy, shape, config) if "micro-batch" in c.description)
    assert change.overrides == ["trainer.per_device_train_batch_size=1", "trainer.gradient_accumulation_steps=12"]
    _, changed, _ = change.apply(policy, shape, config)
    assert changed.micro_batch * changed.gradient_accumulation == 12


def _real_state_bytes(optimizer_class, shapes, **kwargs) -> int:
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
    optimizer = optimizer_class(params, **kwargs)
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer.step()
    storages = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and not key.startswith("qmap"):  # quantile maps are shared
                storages[value.untyped_storage().data_ptr(), value.untyped_storage().nbytes()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def test_optimizer_state_bytes_equal_what_the_optimizers_keep():
    """Against the optimizers themselves after one step, at bitsandbytes' 4,096-value threshold."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers.optimization import Adafactor

    shapes = [(10,), (4095,), (4096,), (5000,)]
    numels = [s[0] for s in shapes]
    assert planner.optimizer_state_bytes(numels, "adamw_torch") == _real_state_bytes(torch.optim.AdamW, shapes)
    assert planner.optimizer_state_bytes(numels, "paged_adamw_32bit") == _real_state_bytes(bnb.optim.PagedAdamW32bit, shapes)
    assert planner.optimizer_state_bytes(numels, "adamw_bnb_8bit") == _real_state_bytes(bnb.optim.AdamW8bit, shapes)
    assert planner.optimizer_state_bytes(numels, "sgd") == _real_state_bytes(torch.optim.SGD, shapes, lr=0.1) == 0
    # Adafactor (as the Trainer makes it: no first moment): the plan is an upper bound, reached by vectors
    mixed = [(10,), (4096,), (64, 48)]
    adafactor = _real_state_bytes(Adafactor, mixed, lr=1e-3, relative_step=False, scale_parameter=False)
    assert planner.optimizer_state_bytes([10, 4096, 64 * 48], "adafactor") >= adafactor
    vectors = _real_state_bytes(Adafactor, [(10,), (4096,)], lr=1e-3, relative_step=False, scale_parameter=False)
    assert planner.optimizer_state_bytes([10, 4096], "adafactor") == vectors
    with pytest.raises(ValueError, match="adamw_apex"):
        planner.optimizer_state_bytes(numels, "adamw_apex")
