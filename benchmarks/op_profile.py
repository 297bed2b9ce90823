"""Where the time goes (``--profile``): one repetition under torch.profiler, self CPU time summed per op group.

The tables of these numbers are written by report.py (``profile_tables``).
"""

from __future__ import annotations

PROFILE_GROUPS = [  # (group, predicate on the op name), first match wins; self CPU time of each op
    ("matmul", lambda n: n in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")),
    ("attention (SDPA)", lambda n: "scaled_dot_product" in n),
    ("log_softmax and CTC", lambda n: "ctc_loss" in n or "log_softmax" in n),
    ("conv (oneDNN)", lambda n: n in ("aten::mkldnn_convolution", "aten::convolution_backward")),
    ("norms", lambda n: "norm" in n and n.startswith("aten::")),
    ("gelu", lambda n: n.startswith("aten::gelu")),
    ("copies and casts", lambda n: n in ("aten::copy_", "aten::cat", "aten::index", "aten::_index_put_impl_")),
    ("optimizer kernels", lambda n: n in ("aten::_fused_adamw_", "aten::lerp_", "aten::addcdiv_", "aten::addcmul_",
                                          "aten::_foreach_lerp_", "aten::_foreach_addcdiv_", "aten::_foreach_sqrt",
                                          "aten::_foreach_mul_", "aten::_foreach_add_", "aten::_foreach_div_",
                                          "aten::_foreach_addcmul_", "aten::sqrt")),
    ("elementwise", lambda n: n in ("aten::mul", "aten::div", "aten::add", "aten::mul_", "aten::add_", "aten::sum",
                                    "aten::fill_", "aten::neg", "aten::masked_fill_", "aten::where", "aten::pow")),
]


def profile_step(runner) -> dict:
    """One repetition under torch.profiler: self CPU seconds per op group, and the heaviest ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.fn()
    groups: dict[str, float] = {}
    ops = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        group = next((g for g, match in PROFILE_GROUPS if match(event.key)), "other")
        groups[group] = groups.get(group, 0.0) + seconds
        ops.append((seconds, event.key, event.count))
    ops.sort(reverse=True)
    return {"groups": groups, "top": ops[:8], "total": sum(groups.values())}
