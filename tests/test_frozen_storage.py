"""Where frozen weights are kept (issue 17): the input embedding table in host memory (`trainer.offload_embeddings`),
lm_head and a frozen / LayerNorm-tuned vision tower in int8 rows (`precision.lm_head_bits=8`,
`precision.vision_tower_bits=8`). Each lever keeps the trainable names, keeps the loss within its own rounding,
exports exactly what a run without it exports, and the planner counts exactly the bytes the built model holds."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nvila_ft.adapters import AdapterPolicy, apply_policy, load_for_policy
from nvila_ft.adapters import frozen_storage
from nvila_ft.adapters.apply import get_component
from nvila_ft.adapters.artifacts import load_adapters, save_adapters
from nvila_ft.adapters.frozen_storage import (
    FrozenStorage,
    HostEmbedding,
    Int8RowLinear,
    dequantize_rows,
    quantize_rows,
    store_frozen_weights,
    vision_linears,
)
from nvila_ft.adapters.merge import merge_adapters
from nvila_ft.adapters.optim import parameter_groups
from nvila_ft.adapters.policy import COMPONENTS, ComponentPolicy
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model.checkpoint import iter_safetensors, read_config
from nvila_ft.model.source import ModelSource
from nvila_ft.recipes.loading import load_model
from nvila_ft.training import planner
from nvila_ft.training.config import ConfigError, Precision, TrainerConfig
from nvila_ft.training.planner import RunShape
from nvila_ft.training.run_checks import check_run, frozen_storage as run_storage
from tests.test_planner import conversation, stored_bytes
from tests.tolerances import TINY_TRAIN_STEP, reordered, worst

POLICY = AdapterPolicy(
    vision_tower=ComponentPolicy(method="layernorm", lr_ratio=0.1),
    mm_projector=ComponentPolicy(method="full"),
    llm=ComponentPolicy(method="lora", r=4, alpha=8, dropout=0.0),
)
EVERY = FrozenStorage(offload_embeddings=True, lm_head_bits=8, vision_tower_bits=8)
HALF_STEP = 1 / 254  # rounding to the nearest of 127 steps of absmax / 127 errs by at most half a step


def model_with(checkpoint, storage: FrozenStorage, dtype=torch.float32, policy=POLICY):
    model = apply_policy(load_for_policy(checkpoint, policy, dtype, "cpu"), policy)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    model.selective_loss = True
    return store_frozen_weights(model, storage).train()


def batch_of(model, words: int = 12):
    return NVILAProcessor(model.tokenizer, model.config)(conversation(64, 48, words))


# ---------------------------------------------------------------------------------------------- int8 rows
def test_int8_rows_are_within_half_a_step_of_each_weight():
    weight = torch.randn(37, 19, dtype=torch.float64) * torch.logspace(-3, 1, 37, dtype=torch.float64)[:, None]
    weight[5] = 0.0  # an all-zero row stays zero
    codes, absmax = quantize_rows(weight)
    assert codes.dtype == torch.int8 and absmax.dtype == torch.float32 and codes.abs().max() == 127
    restored = dequantize_rows(codes, absmax, torch.float64)
    # half a step of the row's absmax, plus absmax's own rounding to float32 (relative 2^-24, times 127 steps)
    bound = absmax.double()[:, None] * (HALF_STEP + 2**-24)
    assert torch.all((restored - weight).abs() <= bound)
    assert torch.all(restored[5] == 0)


def test_int8_linear_is_the_dequantized_matmul_in_any_slicing(monkeypatch):
    torch.manual_seed(0)
    linear = nn.Linear(24, 50).requires_grad_(False)
    stored = Int8RowLinear.from_linear(linear)
    inputs = torch.randn(3, 7, 24, requires_grad=True)
    weight = stored.dequantized(torch.float32)
    expected = inputs @ weight.t() + linear.bias
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), inputs)
    for slice_values in (1 << 22, 24 * 7, 24):  # one slice, 8 slices of 7 rows (the last shorter), a row at a time
        monkeypatch.setattr(frozen_storage, "INT8_SLICE_VALUES", slice_values)
        out = stored(inputs)
        (grad,) = torch.autograd.grad(out.square().sum(), inputs)
        # forward: each output is the same 24-term dot product; backward: the input's gradient sums 50 rows, in
        # slices here and in one product there, so the two orders differ within the 50-term float32 bound
        torch.testing.assert_close(out, expected, **reordered(24, float(inputs.detach().abs().max() * weight.abs().max() * 24)))
        torch.testing.assert_close(grad, expected_grad, **reordered(50, float(expected.detach().abs().max() * 2 * weight.abs().max() * 50)))
    with pytest.raises(ValueError, match="frozen"):
        Int8RowLinear.from_linear(nn.Linear(4, 4))


# ---------------------------------------------------------------------------------------------- host embedding
def test_host_embedding_stays_out_of_the_model_state_and_moves(tiny_checkpoints):
    model = model_with(tiny_checkpoints["nvila-8b-tiny"], FrozenStorage(offload_embeddings=True))
    table = model.get_input_embeddings()
    assert isinstance(table, HostEmbedding) and table.weight.device.type == "cpu"
    assert not any("embed_tokens" in name for name, _ in model.named_parameters())
    assert not any("embed_tokens" in name for name in model.state_dict())
    model.to(torch.float64)  # Module.to (the Trainer's move to the device) leaves the host table as it is
    assert table.weight.dtype == torch.float32 and model.device.type == "cpu"
    model.to(torch.float32)
    ids = torch.tensor([[1, 5, 2047, 0]])
    reference = dict(iter_safetensors(tiny_checkpoints["nvila-8b-tiny"] / "llm", {"model.embed_tokens.weight"}))
    assert torch.equal(table(ids), reference["model.embed_tokens.weight"][ids])


def test_offloaded_embeddings_train_bit_for_bit_the_same(tiny_checkpoints):
    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    runs = []
    for storage in (FrozenStorage(), FrozenStorage(offload_embeddings=True)):
        torch.manual_seed(0)
        model = model_with(checkpoint, storage)
        optimizer = torch.optim.AdamW(parameter_groups(model, POLICY, 1e-3))
        batch, losses = batch_of(model), []
        for _ in range(3):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
        runs.append((losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert runs[0][0] == runs[1][0]  # the same arithmetic on the same rows: exact
    assert runs[0][1].keys() == runs[1][1].keys()
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])


# ---------------------------------------------------------------------------------------------- int8 lm_head
def test_int8_lm_head_loss_stays_within_its_rounding_at_every_step(tiny_checkpoints):
    """At each of three training steps the loss through the int8 lm_head is compared with the 16-bit head's on the
    same hidden rows: a logit moves by at most sum_i |x_i| |dW_vi| <= ||x||_1 absmax_v / 254, cross-entropy
    (logsumexp minus the target's logit) by at most twice the largest logit change, and the mean by its largest row."""
    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    model = model_with(checkpoint, FrozenStorage(lm_head_bits=8))
    plain = nn.Linear(64, 2048, bias=False).requires_grad_(False)
    plain.weight.copy_(dict(iter_safetensors(checkpoint / "llm", {"lm_head.weight"}))["lm_head.weight"])
    base = model.llm.get_base_model()
    stored = base.lm_head
    rows: list[torch.Tensor] = []
    stored.register_forward_hook(lambda module, args, out: rows.append(args[0].detach()))
    optimizer = torch.optim.AdamW(parameter_groups(model, POLICY, 1e-2))
    batch = batch_of(model)
    for _ in range(3):
        rows.clear()
        loss = model(**batch).loss
        loss.backward()
        x = torch.cat(rows)
        base.lm_head = plain  # the same weights, the 16-bit head
        with torch.no_grad():
            reference = model(**batch).loss
        base.lm_head = stored
        optimizer.step()
        optimizer.zero_grad()
        logit_change = float((x.abs().sum(1, keepdim=True) * stored.weight_absmax[None] * HALF_STEP).max())
        rounding = worst(TINY_TRAIN_STEP) * max(float(reference), 1.0)
        assert abs(float(loss) - float(reference)) <= 2 * logit_change + rounding
        assert float(loss) != float(reference)  # the head is really int8


def test_int8_vision_tower_passes_gradients_to_its_norms_within_first_order(tiny_checkpoints):
    """The LayerNorm-tuned tower in int8 rows: every trained norm still gets a gradient, and the loss moves by no
    more than the first-order bound sum |dL/dW| |dW| with |dW| <= absmax / 254 (twice it, for the second-order
    remainder, orders of magnitude smaller at these weights)."""
    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    plain, stored = model_with(checkpoint, FrozenStorage()), model_with(checkpoint, FrozenStorage(vision_tower_bits=8))
    batch = batch_of(plain)
    trained = {n for n, p in plain.named_parameters() if p.requires_grad and n.startswith("vision_tower.")}
    linears = [linear for _, _, linear in vision_linears(plain)]
    for linear in linears:
        linear.weight.requires_grad_(True)
    plain_loss = plain(**batch).loss
    plain_loss.backward()
    stored_loss = stored(**batch).loss
    stored_loss.backward()
    first_order = sum(float((l.weight.grad.abs() * l.weight.detach().abs().amax(1, keepdim=True) * HALF_STEP).sum()) for l in linears)
    assert abs(float(stored_loss) - float(plain_loss)) <= 2 * first_order + worst(TINY_TRAIN_STEP) * float(plain_loss)
    assert sum(isinstance(m, Int8RowLinear) for m in stored.vision_tower.modules()) == 6 * len(stored.vision_tower.used_layers())
    norms = [(n, p) for n, p in stored.vision_tower.named_parameters() if p.requires_grad]
    assert norms and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in norms)
    assert trained == {f"vision_tower.{n}" for n, _ in norms}


# ---------------------------------------------------------------------------------------------- export and names
def test_every_lever_keeps_trainable_names_and_exports_what_a_run_without_them_exports(tiny_checkpoints, tmp_path):
    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    stored = model_with(checkpoint, EVERY)
    plain = model_with(checkpoint, FrozenStorage())
    assert [n for n, p in stored.named_parameters() if p.requires_grad] == [n for n, p in plain.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(stored, POLICY, 1e-2))
    batch = batch_of(stored)
    stored(**batch).loss.backward()
    optimizer.step()
    save_adapters(stored, POLICY, tmp_path / "adapters")
    merged = merge_adapters(stored).state_dict()
    fresh = NVILA_from(checkpoint)
    load_adapters(fresh, tmp_path / "adapters")
    expected = merge_adapters(fresh).state_dict()
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected), [k for k in expected if not torch.equal(merged[k], expected[k])][:5]
    assert not frozen_storage.has_frozen_storage(stored)


def NVILA_from(checkpoint):  # noqa: N802 - the plain model as export loads it
    from nvila_ft.model.modeling_nvila import NVILAForConditionalGeneration

    return NVILAForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- the planner
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("policy_name", ["ln_vit_lora_llm", "ln_vit_qlora_llm", "frozen_vit_lora_llm"])
def test_planned_weight_bytes_equal_what_the_built_model_holds(tiny_checkpoints, policy_name, dtype):
    from tests.test_planner import ROOT, preset_policy

    policy = preset_policy(ROOT / "adapters" / f"{policy_name}.yaml")
    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    model = apply_policy(load_for_policy(checkpoint, policy, dtype, "cpu"), policy)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    store_frozen_weights(model, EVERY)
    shape = RunShape(weights_dtype=dtype, cuda=False, offload_embeddings=True, lm_head_bits=8, vision_tower_bits=8)
    meta = planner.meta_model(read_config(checkpoint), policy, dtype, shape.lora_float32, shape.storage)
    planned = {line.component: line.bytes for line in planner.weight_lines(meta, policy, shape)}
    assert planned == {name: stored_bytes(get_component(model, name).parameters()) for name in COMPONENTS}
    without = {line.component: line.bytes for line in planner.weight_lines(planner.meta_model(read_config(checkpoint), policy, dtype), policy, RunShape(weights_dtype=dtype, cuda=False))}
    config = read_config(checkpoint)
    vocab, width = config.vocab_size, config.llm_hidden_size
    # what the levers take off: the table (vocab x width) and lm_head's 16-bit weight, for int8 rows and row scales
    assert without["llm"] - planned["llm"] == vocab * width * (2 * dtype.itemsize - 1) - 4 * vocab


def test_planned_peak_with_every_lever_is_near_the_measured_peak(tmp_path):
    """The 8B layout at small width with every lever: the plan within 10% of the profiler's peak, the host table
    taken off the measure as a GPU's counter never sees it."""
    from nvila_ft.model.presets import save_preset_checkpoint
    from nvila_ft.training.peak import peak_bytes
    from tests.test_planner import ROOT, preset_policy

    checkpoint = save_preset_checkpoint(tmp_path / "small", "nvila-8b-small")
    policy = preset_policy(ROOT / "adapters" / "ln_vit_lora_llm.yaml")
    shape = RunShape(weights_dtype=torch.bfloat16, cuda=False, selective_loss=True, checkpointing=("vision_tower", "llm"),
                     offload_embeddings=True, lm_head_bits=8, vision_tower_bits=8)
    model = model_with(checkpoint, shape.storage, torch.bfloat16, policy)
    model.activation_checkpointing_enable(components=shape.checkpointing)
    processor = NVILAProcessor(model.tokenizer, model.config)
    chat = conversation(128, 128, 200)
    batch = processor(chat)
    optimizer = torch.optim.AdamW(parameter_groups(model, policy, 1e-4))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    table = model.get_input_embeddings().weight
    measured = peak_bytes(step, "cpu") - table.numel() * table.element_size()
    size = processor.measure(chat)
    estimate = planner.plan(read_config(checkpoint), policy, planner.SampleDemand(size.positions, size.tiles, size.supervised), shape)
    assert abs(estimate.allocated - measured) / measured <= 0.10, (estimate.by_item(), measured)


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("storage, llm, vision, message", [
    (FrozenStorage(offload_embeddings=True), ComponentPolicy(method="full"), None, "adapters.llm.method = full trains it"),
    (FrozenStorage(lm_head_bits=8), ComponentPolicy(method="lora", target_modules=["q_proj", "lm_head"]), None, "targets lm_head"),
    (FrozenStorage(lm_head_bits=2), ComponentPolicy(method="lora"), None, "precision.lm_head_bits = 2; use 16, 8 or 4"),
    (FrozenStorage(vision_tower_bits=8), ComponentPolicy(method="lora"), ComponentPolicy(method="lora"),
     "adapters.vision_tower.method = lora; use precision.vision_tower_bits=16"),
])
def test_levers_that_cannot_apply_are_refused_before_loading(storage, llm, vision, message):
    from nvila_ft.training.deepspeed import DeepSpeedConfig

    policy = AdapterPolicy(vision_tower=vision or ComponentPolicy(method="layernorm"), mm_projector=ComponentPolicy(method="full"), llm=llm)
    precision = Precision(lm_head_bits=storage.lm_head_bits, vision_tower_bits=storage.vision_tower_bits)
    trainer = TrainerConfig(offload_embeddings=storage.offload_embeddings)
    assert run_storage(precision, trainer) == storage
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_run(policy, precision, trainer, DeepSpeedConfig())


def test_levers_are_refused_under_deepspeed_and_on_a_tied_lm_head(tiny_checkpoints, tmp_path):
    pytest.importorskip("deepspeed", reason="the DeepSpeed refusal is checked where deepspeed is installed")
    from nvila_ft.training.deepspeed import DeepSpeedConfig

    with pytest.raises(ConfigError, match="levers of runs without DeepSpeed"):
        check_run(POLICY, Precision(lm_head_bits=8), TrainerConfig(), DeepSpeedConfig(stage=2))
    lite = ModelSource(path=str(tiny_checkpoints["nvila-lite-tiny"]))
    with pytest.raises(ConfigError, match="ties lm_head to the input embeddings"):
        load_model(lite, tmp_path, Precision(), policy=POLICY, storage=FrozenStorage(offload_embeddings=True))


def test_levers_from_the_command_line(tmp_path):
    from tests.test_cli import one_line_error, run_cli

    cache = tmp_path / "cache"
    small = ["task.train.num_records=8", "trainer.max_steps=2", "trainer.per_device_train_batch_size=4",
             "trainer.eval_steps=null", "eval.before_training=false", "eval.max_records=2"]
    levers = ["trainer.offload_embeddings=true", "precision.lm_head_bits=8", "precision.vision_tower_bits=8"]
    run = tmp_path / "levers"
    run_cli(["finetune", *levers, *small, f"hydra.run.dir={run}"], tmp_path, cache)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2
    assert "frozen weights kept: the input embedding table in host memory, lm_head in int8 rows, the vision tower's linears in int8 rows" in (run / "cli.log").read_text()
    wrong = run_cli(["finetune", "precision.vision_tower_bits=4", f"hydra.run.dir={tmp_path / 'w'}"], tmp_path, cache, check=False)
    assert wrong.returncode == 1 and one_line_error(wrong).endswith("precision.vision_tower_bits = 4; use 16 or 8")


def test_plan_offers_each_lever_only_where_it_applies():
    from nvila_ft.model.presets import preset_config
    from tests.test_planner import ROOT, preset_policy

    def offered(preset: str, policy_name: str) -> set[str]:
        policy = preset_policy(ROOT / "adapters" / f"{policy_name}.yaml")
        config = preset_config(preset, torch.bfloat16)
        return {o for change in planner.changes(policy, RunShape(), config) for o in change.overrides}

    storage = {"trainer.offload_embeddings=true", "precision.lm_head_bits=8", "precision.vision_tower_bits=8"}
    assert storage <= offered("nvila-8b", "ln_vit_qlora_llm")
    assert offered("nvila-lite-2b", "ln_vit_qlora_llm") & storage == {"precision.vision_tower_bits=8"}  # tied lm_head
    assert offered("nvila-8b", "lora_vit_lora_llm") & storage == storage - {"precision.vision_tower_bits=8"}
    assert offered("nvila-8b", "ft_vit_ft_llm") & storage == set()


def test_nf4_lm_head_is_bitsandbytes_nf4_in_slices_within_its_half_gap(tiny_checkpoints, monkeypatch):
    """precision.lm_head_bits=4: the head in bitsandbytes' NF4 blocks of 64; each weight within half the widest gap
    of the NF4 code times its block's absmax, the sliced matmul equal to the dequantized weight's, the loss within
    2 max_r ||x_r||_1 max|dW|, the planner's bytes exact and the export the checkpoint's head."""
    import bitsandbytes.functional as bnb_functional

    from nvila_ft.adapters.frozen_storage import NF4_BLOCK, Nf4RowLinear

    torch.manual_seed(0)
    linear = nn.Linear(128, 40, bias=False).requires_grad_(False)
    monkeypatch.setattr(frozen_storage, "INT8_SLICE_VALUES", 128 * 7)  # slices of 7 rows
    stored = Nf4RowLinear.from_linear(linear)
    restored = stored.dequantized(torch.float32)
    half_gap = float(torch.diff(stored.code).max()) / 2
    block_absmax = stored.weight_absmax.view(40, 128 // NF4_BLOCK).repeat_interleave(NF4_BLOCK, dim=1)
    assert torch.all((restored - linear.weight).abs() <= block_absmax * (half_gap + 2**-24))
    whole, _ = bnb_functional.quantize_4bit(linear.weight, blocksize=NF4_BLOCK, quant_type="nf4")
    assert torch.equal(whole.flatten(), stored.weight.flatten())  # blocks never straddle a slice: the same codes
    inputs = torch.randn(3, 128, requires_grad=True)
    out = stored(inputs)
    torch.testing.assert_close(out, inputs @ restored.t(), **reordered(128, float(inputs.detach().abs().max() * restored.abs().max() * 128)))
    (grad,) = torch.autograd.grad(out.sum(), inputs)
    torch.testing.assert_close(grad, torch.ones(3, 40) @ restored, **reordered(40, float(restored.abs().max() * 40)))

    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    model = model_with(checkpoint, FrozenStorage(lm_head_bits=4))
    head = model.llm.get_base_model().lm_head
    assert isinstance(head, Nf4RowLinear)
    rows: list[torch.Tensor] = []
    head.register_forward_hook(lambda module, args, out: rows.append(args[0].detach()))
    batch = batch_of(model)
    loss = model(**batch).loss
    plain = model_with(checkpoint, FrozenStorage())
    reference = plain(**batch).loss
    weight_change = (head.dequantized(torch.float32) - plain.llm.get_base_model().lm_head.weight).abs().amax(1)
    bound = 2 * float((torch.cat(rows).abs().sum(1, keepdim=True) * weight_change[None]).max()) + worst(TINY_TRAIN_STEP) * float(reference)
    assert abs(float(loss) - float(reference)) <= bound
    shape = RunShape(weights_dtype=torch.float32, cuda=False, lm_head_bits=4)
    meta = planner.meta_model(read_config(checkpoint), POLICY, torch.float32, shape.lora_float32, shape.storage)
    planned = {line.component: line.bytes for line in planner.weight_lines(meta, POLICY, shape)}
    assert planned["llm"] == stored_bytes(model.llm.parameters())
    merged = merge_adapters(model)
    expected = dict(iter_safetensors(checkpoint / "llm", {"lm_head.weight"}))["lm_head.weight"]
    assert torch.equal(merged.llm.lm_head.weight, expected)
