"""What the decode diagnostics (diag_jobs.py, diag_decode.py) share: a watchdog, $OUT, the device, a timed
log, and the 7B model with its prompt."""

import faulthandler
import os
import sys
import time

import torch

from hetegen_fx.models import build_random

OUT = os.environ["OUT"]
dev = torch.device("cuda")
T0 = time.perf_counter()


def watchdog(seconds: float) -> None:
    """Print every thread's stack if the script still runs after ``seconds``."""
    faulthandler.dump_traceback_later(seconds, file=sys.stderr)


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def llama_7b():
    """The Llama-2-7B shape with random fp16 weights, a 512-token prompt and greedy generate() options."""
    m = build_random("llama-2-7b", dtype=torch.float16)
    ids = torch.randint(3, 32000, (1, 512), generator=torch.Generator().manual_seed(0))
    return m, ids, dict(do_sample=False, pad_token_id=0)
