"""Attention schedules in transformers training: a ``TrainerCallback`` and the loop function.

A ``Sparse*`` model whose config has ``<role>_attn_schedule`` fields holds one scheduled
:class:`plugin.AttentionMechanism` per attention module. The schedules read the number of
optimizer updates done so far from each mechanism's ``schedule_step`` buffer, which the
training loop sets:

- ``Trainer``: ``Trainer(..., callbacks=[AttentionScheduleCallback()])`` sets it from
  ``state.global_step`` at the start of every update (and of training, so a resumed run,
  ``trainer.train(resume_from_checkpoint=...)``, continues from the same value);
- a hand-written or accelerate loop: ``set_schedule_step(model, updates_done)`` before each
  update (``scripts/finetune.py`` does);
- inference: ``finish_schedules(model)`` moves every schedule to its end value.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from plugin.schedule import finish_schedules, schedule_state, set_schedule_step

__all__ = ["AttentionScheduleCallback", "finish_schedules", "schedule_state", "set_schedule_step"]


class AttentionScheduleCallback(TrainerCallback):
    """Drive the attention schedules of the model that ``Trainer`` trains with its update count."""

    def _set(self, state: Any, model: Any) -> None:
        if model is not None:
            set_schedule_step(model, int(state.global_step))

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._set(state, model)

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._set(state, model)
