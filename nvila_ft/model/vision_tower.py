"""SigLIP vision tower: stock `SiglipVisionModel`, features from an intermediate layer."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import SiglipVisionModel


class VisionTower(nn.Module):
    """Runs SigLIP on square tiles and returns the hidden states after its first `num_layers_used` encoder layers
    (`hidden_states[select_layer]`) for every patch token.

    With the official select layer -2 the last encoder layer and `post_layernorm` never influence the output.
    A tower loaded from a checkpoint does not hold them at all (`drop_unused`, `load_vision_tower`); a tower built
    whole (presets) keeps them, never runs them and keeps them frozen.
    """

    def __init__(self, model: SiglipVisionModel, num_layers_used: int) -> None:
        super().__init__()
        self.model = model
        self.num_layers_used = num_layers_used

    @property
    def transformer(self) -> nn.Module:
        """The module holding `embeddings` and `encoder`, under any PEFT wrapper and whatever the nesting
        (transformers < 5.18 nests it as `vision_model`)."""
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return getattr(model, "vision_model", model)

    def used_layers(self) -> list[nn.Module]:
        return list(self.transformer.encoder.layers[: self.num_layers_used])

    def unused_parameter_names(self) -> list[str]:
        """Names (relative to this module) of the parameters that cannot affect the selected features:
        the encoder layers after the selected one and `post_layernorm` (none once they are dropped)."""
        used = {id(p) for p in self.transformer.embeddings.parameters()}
        used |= {id(p) for layer in self.used_layers() for p in layer.parameters()}
        return [name for name, p in self.named_parameters() if id(p) not in used]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, S, S] -> [tiles, (S/patch)^2, hidden], in the dtype of `pixel_values`."""
        body = self.transformer
        weight = body.embeddings.patch_embedding.weight
        hidden = body.embeddings(pixel_values.to(device=weight.device, dtype=weight.dtype))
        for layer in body.encoder.layers[: self.num_layers_used]:
            output = layer(hidden, None)
            hidden = output[0] if isinstance(output, tuple) else output
        return hidden.to(pixel_values.dtype)


def unused_keys(keys: list[str], num_layers_used: int) -> list[str]:
    """The state-dict keys (official or module names) of what cannot affect the features of the first
    `num_layers_used` layers: later encoder layers, `post_layernorm`, the pooling `head`."""
    pattern = re.compile(r"^(vision_model\.)?(encoder\.layers\.(\d+)\.|post_layernorm\.|head\.)")
    unused = []
    for key in keys:
        match = pattern.match(key)
        if match and (match.group(3) is None or int(match.group(3)) >= num_layers_used):
            unused.append(key)
    return unused


def drop_unused(model: SiglipVisionModel, num_layers_used: int) -> SiglipVisionModel:
    """Remove (in place) the encoder layers after the first `num_layers_used`, `post_layernorm` and the pooling
    head, which cannot affect the selected features; the stock forward is then unavailable (VisionTower runs
    the layers itself). Returns the model."""
    body = getattr(model, "vision_model", model)
    del body.encoder.layers[num_layers_used:]
    for name in ("post_layernorm", "head"):
        if hasattr(body, name):
            delattr(body, name)
    body.use_head = False
    model.config.num_hidden_layers = num_layers_used
    model.config.vision_use_head = False
    return model
