"""The trainers' optimizer: AdamW, fused where torch has the kernel.

torch's AdamW defaults to its per-parameter for-loop on the CPU (the multi-tensor path is the
default on CUDA only). The fused kernel does the update in one pass per parameter: on 107M
smollm2-135m-sized parameters, 2 threads, a step took 0.22 s instead of 1.35 s. It computes the
same update (bias-corrected moments, decoupled weight decay) up to float rounding.
"""

from __future__ import annotations

import torch


def adamw(params, *, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)
          ) -> torch.optim.AdamW:
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused or None)
