"""fairseq user directory: sparse, structured and continuous attention in fairseq's transformer.

    fairseq-train DATA --user-dir user_dir --arch sparse_transformer \\
        --encoder-attn sparsemax --decoder-attn "entmax:alpha=learned" --cross-attn "fusedmax:lam=0.5"

Importing it registers the ``sparse_transformer`` model and its architectures and the
``translation_optimal_stop`` task (fairseq's translation with a beam search that stops
optimally: ``fairseq-generate ... --task translation_optimal_stop``), allows the
globals of fairseq checkpoints for ``torch.load(weights_only=True)`` and silences the warnings
that fairseq 0.12 commands print and that are known to be harmless (``user_dir.quiet``).
See docs/fairseq.md.
"""

import importlib.util

FAIRSEQ_INSTALL = (
    "pip install -r requirements/build.txt",
    "pip install --no-deps --no-build-isolation fairseq-fixed==0.12.3.1",
    "pip install -r requirements/fairseq.txt",
)
"""How to install the fairseq part, after torch, from the repository root (``make venv`` does the same)."""

if importlib.util.find_spec("fairseq") is None:
    raise ModuleNotFoundError(
        "user_dir is a fairseq user directory and needs fairseq, which is not installed. Install it after torch, "
        "from the repository root: " + "; then ".join(f"`{c}`" for c in FAIRSEQ_INSTALL) + ". fairseq-fixed is "
        "fairseq 0.12 made to run on Python 3.11; --no-deps keeps out torchaudio, which breaks `import "
        "transformers` with this torch, and requirements/fairseq.txt lists its other requirements. `make venv` "
        "does all of it; see docs/installation.md.",
        name="fairseq",
    )

from .quiet import silence_known_fairseq_logs, silence_known_fairseq_warnings  # noqa: E402

silence_known_fairseq_warnings()
silence_known_fairseq_logs()

from .checkpoint_globals import allow_fairseq_checkpoint_globals, reallow_at_each_load  # noqa: E402
from .models import sparse_transformer  # noqa: E402, F401  (registers the model and architectures)
from .tasks import translation_optimal_stop  # noqa: E402, F401  (registers the task)

allow_fairseq_checkpoint_globals()
reallow_at_each_load()
