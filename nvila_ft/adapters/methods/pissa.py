"""`pissa`: LoRA initialised by PiSSA (Meng et al. 2024): A and B start as the principal singular vectors of each
targeted weight (PEFT's `init_lora_weights="pissa"`, or `"pissa_niter_<n>"` for a fast randomized SVD) and the base
keeps the residual, W = W_res + scaling * B0 A0, so the adapted model starts equal to the base model.

The base weights change, so what is saved is not the PiSSA adapter: PEFT converts it into a plain LoRA of the
original base (`save_pretrained(path_initial_model_for_weight_conversion=...)`: A' = [A; A0], B' = [B, -B0], rank
2r), which loads onto the checkpoint like any LoRA adapter (merged or adapter-only exports, `nvila-ft export`). The
initial A0, B0 are kept beside the adapter for that. Resuming reads them back from the same file and rebuilds the
residual the run trained on, whatever SVD the new process computed.
"""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nvila_ft.adapters.methods.base import Option, PolicyError
from nvila_ft.adapters.methods.lora import ADAPTER_WEIGHTS, Lora

INITIAL = "pissa_initial"  # the wrapper's attribute holding A0, B0 by adapter key


class Pissa(Lora):
    name = "pissa"
    options = {**Lora.options, "pissa_niter": Option(0, int, "subspace iterations of a randomized SVD (0: the full SVD)")}

    def check(self, name: str, component: Any, model_config: Any = None, precision: Any = None, deepspeed: Any = None) -> None:
        super().check(name, component, model_config, precision, deepspeed)
        where = f"adapters.{name}"
        if self.option(component, "pissa_niter") < 0:
            raise PolicyError(f"{where}.pissa_niter = {self.option(component, 'pissa_niter')}: must be >= 0 (0: the full SVD)")
        if deepspeed is not None and deepspeed.stage > 0:
            raise PolicyError(f"{where}.method = pissa converts its adapter against the initial one kept in this process, "
                              "which DeepSpeed's partitioned saves do not hold; use deepspeed=none (or method: lora)")

    def peft_options(self, component: Any) -> dict[str, Any]:
        niter = self.option(component, "pissa_niter")
        return {**super().peft_options(component), "init_lora_weights": f"pissa_niter_{niter}" if niter else "pissa"}

    def after_wrap(self, wrapped: nn.Module, component: Any) -> None:
        from peft import get_peft_model_state_dict

        setattr(wrapped, INITIAL, {k: v.detach().clone() for k, v in get_peft_model_state_dict(wrapped).items()})

    def reference_problem(self, name: str) -> str | None:
        return (f"dpo: adapters.{name}.method = pissa keeps a residual base, so its adapters switched off are not the "
                f"reference model; use lora for the {name}")

    # ------------------------------------------------------------------ artifacts
    def save_adapter(self, module: nn.Module, folder: Path, state_dict: dict | None) -> None:
        initial = getattr(module, INITIAL, None)
        if initial is None:  # loaded from a saved (already converted) adapter: a plain LoRA of the original base
            return super().save_adapter(module, folder, state_dict)
        with tempfile.TemporaryDirectory() as scratch:
            start = Path(scratch) / INITIAL
            start.mkdir()
            save_file({k: v.contiguous() for k, v in initial.items()}, str(start / ADAPTER_WEIGHTS))
            with warnings.catch_warnings():  # PEFT advises the conversion to LoRA that this is, while it loads the start
                warnings.filterwarnings("ignore", message="PiSSA changes the base weights")
                module.save_pretrained(str(folder), state_dict=state_dict, path_initial_model_for_weight_conversion=str(start))

    def restore_adapter(self, module: nn.Module, folder: Path) -> None:
        """From the converted adapter [A; A0], [B, -B0]: the residual base becomes W - scaling * B0 A0 of the saved run
        (this process's own A0, B0 added back first), then A and B are the trained ones."""
        initial = getattr(module, INITIAL, None)
        if initial is None:
            return super().restore_adapter(module, folder)
        saved = load_file(str(folder / ADAPTER_WEIGHTS))
        with torch.no_grad():
            for layer_name, layer in module.named_modules():
                if "default" not in getattr(layer, "lora_A", {}):
                    continue
                key_a, key_b = f"{layer_name}.lora_A.weight", f"{layer_name}.lora_B.weight"
                if key_a not in saved or key_b not in saved:
                    raise PolicyError(f"{folder}: no saved adapter for {layer_name}")
                rank = saved[key_a].shape[0] // 2
                a, a0 = saved[key_a][:rank], saved[key_a][rank:]
                b, b0 = saved[key_b][:, :rank], -saved[key_b][:, rank:]
                weight = layer.get_base_layer().weight
                delta = initial[key_b].float() @ initial[key_a].float() - b0.float() @ a0.float()
                weight.copy_((weight.float() + layer.scaling["default"] * delta.to(weight.device)).to(weight.dtype))
                layer.lora_A["default"].weight.copy_(a)
                layer.lora_B["default"].weight.copy_(b)
                initial[key_a], initial[key_b] = a0.clone(), b0.clone()

    # ------------------------------------------------------------------ planner
    def counted_as(self, component: Any) -> Any:
        """The same tensors as LoRA; no SVD of the shapes-only weights."""
        options = {k: v for k, v in component.options.items() if k != "pissa_niter"}
        return dataclasses.replace(component, method="lora", options=options)

    def quantized_variant(self, component: Any) -> Any:
        return None
