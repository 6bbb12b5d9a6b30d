"""The objective in all its forms, as pure tensor functions: sampled-token, top-K and full-vocabulary
signals, the divergences, chunking, and the loss straight from hidden states.

- `registry`: every signal, support, renorm and divergence once (name, description, what it combines
  with; a divergence's row maths and float64 reference); `register_divergence` adds one.
- `token`: dense teacher logits at student-visited positions -> per-token loss (the paper's forms).
- `topk`: the same losses from a teacher that only returns its top-K log-probs (vLLM, HTTP).
- `hidden`: the loss from hidden states and LM-head weights, never materialising ``[B, T, V]`` logits.
- `cross_entropy`: SFT's token cross-entropy the same way, from hidden states and head weights in chunks.

No I/O and no models here: every function is tested against a float64 reference. The names users
import (``opd.objectives.token_loss``, ...) are re-exported from here.
"""

from opd.objectives.registry import Divergence, register_divergence, unregister_divergence
from opd.objectives.token import *  # noqa: F403
from opd.objectives.token import __all__ as _token_all

__all__ = [*_token_all, "Divergence", "register_divergence", "unregister_divergence"]
