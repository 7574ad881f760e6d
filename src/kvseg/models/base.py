"""The pipeline every family shares: encoder -> decoder -> head, with an input check."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvseg.errors import ConfigError


class SegmentationModel(nn.Module):
    """(B, in_channels, H, W) -> logits (B, num_classes, H, W), any H and W.

    Families build three parts: ``encoder(x) -> features`` (a list of maps), ``decoder(features)
    -> (B, C, h, w)`` and ``head`` (a conv to ``num_classes``). The input is zero-padded on the
    bottom/right to a multiple of ``input_multiple`` (the encoder's total stride), the head's
    output is resized bilinearly to the padded size and cropped back, so the logits always have
    the input's exact H × W (also for odd sizes such as 65 × 77).

    Attributes set by the registry: ``name``, ``size``, ``config`` (the resolved dataclass).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, head: nn.Module, *,
                 in_channels: int, num_classes: int, input_multiple: int) -> None:
        super().__init__()
        self.encoder, self.decoder, self.head = encoder, decoder, head
        self.in_channels, self.num_classes = in_channels, num_classes
        self.input_multiple = input_multiple

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`ConfigError` unless x is (B, in_channels, H, W)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(f"input of shape {tuple(x.shape)}: expected "
                              f"(B, {self.in_channels}, H, W)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self.check_input(x)
        h, w = x.shape[-2:]
        m = self.input_multiple
        pad_h, pad_w = (m - h % m) % m, (m - w % m) % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        logits = self.head(self.decoder(self.encoder(x)))
        if tuple(logits.shape[-2:]) != tuple(x.shape[-2:]):
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear",
                                   align_corners=False)
        return logits[..., :h, :w]

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits in eval mode under ``torch.inference_mode()`` (switches the model to eval)."""
        self.eval()
        return self(x)
