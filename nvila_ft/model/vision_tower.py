"""SigLIP vision tower: stock `SiglipVisionModel`, features from an intermediate layer."""

from __future__ import annotations

import torch
from torch import nn
from transformers import SiglipVisionModel


class VisionTower(nn.Module):
    """Runs SigLIP on square tiles and returns `hidden_states[select_layer]` for every patch token.

    Only the layers up to the selected one are computed: with the official select layer -2 the last encoder
    layer and `post_layernorm` never influence the output, so running them would only cost time (they stay
    in the module and in exports).
    """

    def __init__(self, model: SiglipVisionModel, select_layer: int = -2) -> None:
        super().__init__()
        self.model = model
        num_layers = model.config.num_hidden_layers
        self.num_layers_used = select_layer % (num_layers + 1) if select_layer < 0 else select_layer

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
        the encoder layers after the selected one and `post_layernorm`."""
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
