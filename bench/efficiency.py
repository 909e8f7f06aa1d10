"""The efficiency figure of bench/vs_trl.py: this machine's matmul peaks, measured in the same run,
and the model FLOP/s of opd's W step as a share of them."""

from __future__ import annotations

import statistics
import time


def child_peaks(spec: dict) -> dict:
    """This machine's matmul peak (GFLOP/s) in float32 and bfloat16: median of 30 [2048,1024]x[1024,1024]."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        out[f"{name}_gflops"] = 2 * 2048 * 1024 * 1024 / statistics.median(times) / 1e9
    return out


def step_model_flops(params: dict, tokens: int) -> dict:
    """Model FLOPs of one W step (matmuls, 2 per weight per token; attention scores left out): sampling
    (prefill + decode) and the teacher pass are forward only, the student update forward + backward."""
    return {"sample": 2 * params["student"] * tokens, "score": 2 * params["teacher"] * tokens,
            "update": 6 * params["student"] * tokens}


def efficiency(params: dict, tokens: int, peaks: dict, opd_s: dict, trl_best_s: dict) -> dict:
    """Model FLOP/s of opd's W step as a share of the fp32 and bf16 matmul peaks measured in this run,
    and the FLOP floor (teacher pass at the bf16 peak, everything else at the fp32 peak)."""
    flops = step_model_flops(params, tokens)
    total = sum(flops.values())
    out = {"step_model_flops": flops}
    for t in (1, 2):
        achieved = total / opd_s[t] / 1e9
        floor_s = flops["score"] / (peaks[t]["bf16_gflops"] * 1e9) + \
            (flops["sample"] + flops["update"]) / (peaks[t]["fp32_gflops"] * 1e9)
        out[f"{t}_thread"] = {"peak_fp32_gflops": peaks[t]["fp32_gflops"], "peak_bf16_gflops": peaks[t]["bf16_gflops"],
                              "achieved_gflops": achieved,
                              "share_of_fp32_peak": achieved / peaks[t]["fp32_gflops"],
                              "share_of_bf16_peak": achieved / peaks[t]["bf16_gflops"],
                              "floor_s_per_step": floor_s, "floor_ratio_vs_trl_best": floor_s / trl_best_s[t]}
    return out


