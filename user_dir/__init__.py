"""fairseq user directory: sparse, structured and continuous attention in fairseq's transformer.

    fairseq-train DATA --user-dir user_dir --arch sparse_transformer \\
        --encoder-attn sparsemax --decoder-attn "entmax:alpha=learned" --cross-attn "fusedmax:lam=0.5"

Importing it registers the ``sparse_transformer`` model and its architectures, and allows
the globals of fairseq checkpoints for ``torch.load(weights_only=True)``. See docs/fairseq.md.
"""

from .checkpoint_globals import allow_fairseq_checkpoint_globals
from .models import sparse_transformer  # noqa: F401  (registers the model and architectures)

allow_fairseq_checkpoint_globals()
