"""Fixed sinusoidal position tables (Marian, Pegasus) that stay fixed, so a saved model reloads exactly.

transformers builds these tables frozen, but ``from_pretrained`` (5.23) returns them with
``requires_grad=True``; an optimizer over ``model.parameters()`` then trains them, while
``save_pretrained`` leaves them out (``_keys_to_ignore_on_save``) and loading recomputes the
sinusoids: the reloaded model differs from the trained one. The ``Sparse*`` Marian and Pegasus
classes keep the tables frozen after construction and after ``from_pretrained``.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def freeze_position_tables(model: nn.Module) -> list[str]:
    """Mark the parameters of every ``*SinusoidalPositionalEmbedding`` as not trainable; their names."""
    frozen = []
    for name, module in model.named_modules():
        if "SinusoidalPositionalEmbedding" in type(module).__name__:
            for pname, param in module.named_parameters():
                if param.requires_grad:
                    param.requires_grad_(False)
                    frozen.append(f"{name}.{pname}" if name else pname)
    return frozen


class FixedPositionTablesMixin:
    """Keeps a model's sinusoidal position tables frozen (put it first in the bases)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        freeze_position_tables(self)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        loaded = super().from_pretrained(*args, **kwargs)  # type: ignore[misc]
        freeze_position_tables(loaded[0] if isinstance(loaded, tuple) else loaded)  # output_loading_info=True
        return loaded
