"""What the pretrained-weight converters share (:mod:`kvseg.models.convert_vit`,
:mod:`kvseg.models.convert_cvt`): the file's tensors to account for (:class:`SourceTensors`), a
converter's result (:class:`Converted`) and the stem adaptation to other input channel counts.

Below both the converters and their dispatcher :mod:`kvseg.models.pretrained`, so neither imports
the other's module back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvseg.errors import CheckpointError


class SourceTensors:
    """The tensors of a file, each to be consumed (:meth:`pop`) or dropped with a reason.

    :meth:`finish` raises :class:`CheckpointError` if any tensor is left unaccounted for.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], layout: str) -> None:
        self.tensors, self.layout = dict(tensors), layout
        self.dropped: dict[str, str] = {}

    def has(self, key: str) -> bool:
        return key in self.tensors

    def pop(self, key: str) -> torch.Tensor:
        """The tensor ``key``, consumed; CheckpointError if the file lacks it."""
        if key not in self.tensors:
            raise CheckpointError(f"no tensor {key!r}: not a complete {self.layout} file for "
                                  "this model")
        return self.tensors.pop(key)

    def drop(self, match: Callable[[str], bool] | str, reason: str) -> None:
        """Drop every remaining tensor named ``match`` (or for which ``match(key)`` is true)."""
        keys = [k for k in self.tensors if (k == match if isinstance(match, str) else match(k))]
        for k in keys:
            self.tensors.pop(k)
            self.dropped[k] = reason

    def finish(self) -> None:
        if self.tensors:
            rest = sorted(self.tensors)
            raise CheckpointError(
                f"{len(rest)} tensor(s) of the {self.layout} file have no place in the model "
                f"(first: {rest[0]} {tuple(self.tensors[rest[0]].shape)}); the file's network is "
                "deeper or differently built than the model's configuration")


@dataclass
class Converted:
    """A converter's result: model tensors by name, which were computed, what was dropped
    (file key -> reason), what stays initialised (model key -> reason), KV fidelity rows."""

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    computed: set[str] = field(default_factory=set)
    dropped: dict[str, str] = field(default_factory=dict)
    fresh: dict[str, str] = field(default_factory=dict)
    kv: list[dict] = field(default_factory=list)

    def put(self, key: str, value: torch.Tensor, computed: bool = False) -> None:
        self.state[key] = value.contiguous()
        if computed:
            self.computed.add(key)


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """An RGB stem kernel (O, 3, kh, kw) for ``in_channels`` inputs, as timm's
    ``adapt_input_conv``: summed over RGB for 1 channel; for C channels, RGB repeated
    ceil(C/3) times, cut to C and scaled by 3/C (the response to a grey image is kept)."""
    c = weight.shape[1]
    if in_channels == c:
        return weight
    if c != 3:
        raise CheckpointError(f"stem kernel with {c} input channels: only 3 (RGB) can be adapted "
                              f"to in_channels={in_channels}")
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_channels / 3)
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (3 / in_channels)


__all__ = ["Converted", "SourceTensors", "adapt_input_conv"]
