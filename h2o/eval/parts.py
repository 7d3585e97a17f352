"""Where a prefill's time goes: `h2o perf --prefill-parts` profiles one prefill per configuration (torch.profiler,
the real code path) and sums the attention's operators by part.

Parts (top-level operators only: a matmul's own bmm is not counted twice):
- QKᵀ, PV: the attention's matmuls (h2o's one-pass attention, `h2o.attention.fused_attention`), told apart by
  their operands (QKᵀ's second operand is the keys transposed, [.., D, L]; PV's the values, [.., L, Dv]);
- softmax, column sums (`aten::sum`: the mass each key received), masks (the causal triangle's fill);
- eviction: the rank, top-k and gather that cut the prompt back to the budget;
- SDPA: `scaled_dot_product_attention`, what a rule that observes no attention (StreamingLLM) runs instead;
- projections: the attention modules' q, k, v and o `aten::linear`s (the same in every configuration);
- other attention operators: the attention modules' time less all of the above (rotation, copies, views,
  allocations, the cache's bookkeeping; many small operators, whose per-operator cost grows with threads).
Times are the profiler's (CPU time, or device time on CUDA) in ms for the whole forward (all layers); the
profiler adds its own overhead per operator, so compare the parts with each other and with SDPA in the same run,
not with the unprofiled prefill times.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile, record_function

PARTS = ("QKᵀ", "softmax", "PV", "column sums", "masks", "eviction", "SDPA")
REST = ("projections", "other attention operators")  # the rest of the attention modules' time, by difference
_BY_NAME = {
    "aten::softmax": "softmax", "aten::_softmax": "softmax", "aten::sum": "column sums",
    "aten::masked_fill_": "masks", "aten::masked_fill": "masks", "aten::triu_": "masks",
    "aten::topk": "eviction", "aten::argsort": "eviction", "aten::sort": "eviction", "aten::gather": "eviction",
    "aten::scaled_dot_product_attention": "SDPA",
}


def classify(event, head_dim: int) -> str | None:
    if event.name in ("aten::matmul", "aten::bmm"):
        shapes = event.input_shapes or []
        second = shapes[1] if len(shapes) == 2 else []
        # QKᵀ's second operand is [.., D, L], PV's [.., L, Dv] (Dv = D here); a block with L = D costs the same
        return "PV" if len(second) >= 2 and second[-1] == head_dim and second[-2] != head_dim else "QKᵀ"
    return _BY_NAME.get(event.name)


SCOPE = "h2o.parts.attention"  # the profiler scope each attention module's forward runs in while profiled


def part_times(events, head_dim: int, cuda: bool) -> dict[str, float]:
    """ms per part over `events` (a profiler's events): operators inside an attention module's scope, each once
    (not under another classified operator, nor under a projection's aten::linear)."""
    totals = dict.fromkeys(PARTS + REST, 0.0)
    ms = (lambda e: e.device_time_total / 1000) if cuda else (lambda e: e.cpu_time_total / 1000)  # noqa: E731
    scope_ms = 0.0
    for event in events:
        if event.name == SCOPE:
            scope_ms += ms(event)
            continue
        if event.name == "aten::linear" and _in_scope(event):
            totals["projections"] += ms(event)
            continue
        part = classify(event, head_dim)
        if part is None:
            continue
        below = []  # the operators between the event and its attention module's scope
        for parent in _ancestors(event):
            if parent.name == SCOPE:
                if not any(p.name == "aten::linear" or classify(p, head_dim) is not None for p in below):
                    totals[part] += ms(event)
                break
            below.append(parent)
    totals["other attention operators"] = max(0.0, scope_ms - sum(totals[p] for p in PARTS) - totals["projections"])
    return totals


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _in_scope(event) -> bool:
    return any(parent.name == SCOPE for parent in _ancestors(event))


def profile_prefill(model, forward, head_dim: int, device: torch.device) -> dict[str, float]:
    """Parts (ms) of one call of `forward` (a prefill of `model`), under the profiler."""
    from .speed import attention_modules

    cuda = device.type == "cuda"
    scopes, handles = [], []

    def enter(*_):
        scopes.append(record_function(SCOPE))
        scopes[-1].__enter__()

    def leave(*_):
        scopes.pop().__exit__(None, None, None)

    for module in attention_modules(model):
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with profile(activities=activities, record_shapes=True) as prof:
            torch.zeros(1, device=device).add_(1)  # the session's first operators pay its start-up, outside the scope
            forward()
            if cuda:
                torch.cuda.synchronize(device)
    finally:
        for handle in handles:
            handle.remove()
    return part_times(prof.events(), head_dim, cuda)
