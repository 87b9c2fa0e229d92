"""Fixed sinusoidal position tables (Marian, Pegasus) that stay fixed, so a saved model reloads exactly.

transformers builds these tables frozen, but ``from_pretrained`` (5.23) returns them with
``requires_grad=True``; an optimizer over ``model.parameters()`` then trains them, while
``save_pretrained`` leaves them out (``_keys_to_ignore_on_save``) and loading recomputes the
sinusoids: the reloaded model differs from the trained one. The ``Sparse*`` Marian and Pegasus
classes keep the tables frozen after construction and after ``from_pretrained``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from . import compat

if TYPE_CHECKING:  # the mixin is always combined with a transformers model class
    from transformers import PreTrainedModel as _ModelBase
else:
    _ModelBase = object


def freeze_position_tables(model: nn.Module) -> list[str]:
    """Mark the parameters of every sinusoidal position table as not trainable; their names."""
    frozen = []
    for name, module in model.named_modules():
        if compat.is_fixed_position_table(module):
            for pname, param in module.named_parameters():
                if param.requires_grad:
                    param.requires_grad_(False)
                    frozen.append(f"{name}.{pname}" if name else pname)
    return frozen


class FixedPositionTablesMixin(_ModelBase):
    """Keeps a model's sinusoidal position tables frozen (put it first in the bases)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        freeze_position_tables(self)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        loaded = super().from_pretrained(*args, **kwargs)
        freeze_position_tables(loaded[0] if isinstance(loaded, tuple) else loaded)  # output_loading_info=True
        return loaded

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        note = "Its sinusoidal position tables stay frozen, so a trained, saved and reloaded model is identical."
        if cls.__doc__ and note not in cls.__doc__:
            cls.__doc__ += "\n\n" + note
