"""Library output that tells a pollinate user nothing, silenced in one place before the models load.

Every node prints these on every load, so a 2-node run drowned its own round lines: transformers' load
reports, PEFT's "Could not find a config file" (the GGUF directory has no config.json; pollinate never
resizes the vocabulary, which is all PEFT checks it for), the GGUF loader's 272-line de-quantisation
progress bar (transformers ignores ``disable_progress_bar`` there) and bitsandbytes' note that an
optional faster CPU kernel package is not installed (that one in ``pollinate/__init__.py``, which runs first).
``quiet_gguf_progress`` prints one line instead of the bar.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from collections.abc import Iterator

import transformers

transformers.logging.set_verbosity_error()  # the "classifier MISSING" load report is expected: the head is the adapter's
transformers.logging.disable_progress_bar()
# PEFT still asks transformers 5 the old name of this property; harmless, and printed by every node every round.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
warnings.filterwarnings("ignore", message="Could not find a config file in .* - will assume that the vocabulary")


@contextlib.contextmanager
def quiet_gguf_progress(what: str) -> Iterator[None]:
    """One line saying what is loading, instead of the GGUF loader's per-tensor progress bar."""
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf

    print(f"loading {what} (de-quantising its GGUF weights)", file=sys.stderr, flush=True)
    original = gguf.tqdm
    gguf.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        gguf.tqdm = original
