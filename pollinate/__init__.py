"""pollinate: federated LoRA fine-tuning on Flower. The subpackages are the repository's root folders."""

import logging

# bitsandbytes logs at import time that an optional faster CPU kernel package (`kernels`) is missing. PEFT imports
# it before any pollinate module could quiet it, and every node process would print it: this is the one line of
# pollinate that runs before every import (the rest of the library noise is quieted in models/console.py).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
