"""Silence the warnings that every fairseq 0.12 command prints and that are known to be harmless.

Each filter matches one message *and* the module that issues it, so the same message from any
other module, and every other warning of these modules, is still shown. Nothing is added when
the user chose warning filters (``python -W ...`` or ``PYTHONWARNINGS``): theirs apply unchanged.

What is silenced, and why it is harmless:

- Hydra 1.3 deprecations of the API fairseq 0.12 uses to build its configuration
  (``hydra.experimental.initialize/compose``, ``version_base``, ``# @package _group_``,
  ConfigStore schema matching, the ``strict`` flag): fairseq's configuration is built correctly;
  they announce Hydra 1.4 changes, and the environment pins ``hydra-core<1.4``.
- torch's ``'pin_memory' argument is set as true but no accelerator is found`` from fairseq's data
  loader on a machine without a GPU: pinning is skipped, nothing else changes.
- torch's ``torch.cuda.amp.autocast(args...)`` deprecation from fairseq's train step: the context
  is disabled unless ``--amp`` is given, and it still works with ``--amp`` on CUDA.

And one log line: fairseq's ``Please install tensorboardX: pip install tensorboardX`` (INFO, logger
``fairseq.tasks.text_to_speech``), about the text-to-speech task's optional TensorBoard logging.
It is dropped when ``user_dir`` is imported before fairseq (``import user_dir`` in Python); the
fairseq commands print it while importing fairseq, before they load ``--user-dir``.
"""

from __future__ import annotations

import logging
import sys
import warnings

# (message regex, category, module regex): the module is the one the warning is attributed to
KNOWN_HARMLESS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"hydra\.experimental\.(initialize|compose)\(\) is no longer experimental", UserWarning,
     r"hydra\.experimental\."),
    (r"\s*The version_base parameter is not specified", UserWarning, r"hydra\.experimental\.initialize"),
    (r"In '[^']*': Usage of deprecated keyword in package header '# @package _group_'", UserWarning,
     r"hydra\.core\.default_element"),
    (r"\s*'[^']*' is validated against ConfigStore schema with the same name", UserWarning, r"sys$"),
    (r"\s*The strict flag in the compose API is deprecated", UserWarning, r"hydra\.compose"),
    (r"'pin_memory' argument is set as true but no accelerator is found", UserWarning,
     r"torch\.utils\.data\.dataloader"),
    (r"`torch\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated", FutureWarning, r"fairseq\."),
)


def silence_known_fairseq_warnings() -> bool:
    """Add the filters of :data:`KNOWN_HARMLESS` (once); False when the user set warning options."""
    if sys.warnoptions:
        return False
    present = {(f[1].pattern if f[1] else "", f[2], f[3].pattern if f[3] else "") for f in warnings.filters
               if f[0] == "ignore"}
    for message, category, module in KNOWN_HARMLESS:
        if (message, category, module) not in present:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
    return True


# (logger name, message prefix) of log records known to be harmless
KNOWN_HARMLESS_LOGS: tuple[tuple[str, str], ...] = (
    ("fairseq.tasks.text_to_speech", "Please install tensorboardX"),
)


class DropMessages(logging.Filter):
    """A logger filter that drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_known_fairseq_logs() -> None:
    """Add a :class:`DropMessages` filter for each of :data:`KNOWN_HARMLESS_LOGS` to its logger (once)."""
    for name, prefix in KNOWN_HARMLESS_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(DropMessages(prefix))
