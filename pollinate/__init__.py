"""pollinate: federated LoRA fine-tuning on Flower. The subpackages are the repository's root folders."""

import logging

# bitsandbytes logs at import time that an optional faster CPU kernel package (`kernels`) is missing. PEFT imports
# it before any pollinate module could quiet it, and every node process would print it: this is the one line of
# pollinate that runs before every import (the rest of the library noise is quieted in models/console.py).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import warnings  # noqa: E402

# A library torch loads in every node process still decorates with torch.jit.script_method, and torch 2.13 warns
# about it at import: two lines per simulated node in the console that say nothing about the run.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning)
