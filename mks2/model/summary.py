"""Human-readable parameter counts: total / trainable / frozen, per component."""

from __future__ import annotations

from torch import nn

COMPONENTS = ("embeddings", "attention", "mlp", "mvm", "router", "lora", "norms", "head", "vision", "retrieval")


def component_of(name: str) -> str:
    """Component of a parameter name (see COMPONENTS); ``other`` if unknown."""
    if "lora_A" in name or "lora_B" in name:
        return "lora"
    if name.startswith("vision."):
        return "vision"
    if name.startswith("retrieval."):
        return "retrieval"
    if name.startswith("lm_head."):
        return "head"
    if "embed_tokens" in name:
        return "embeddings"
    if ".router." in name:
        return "router"
    if ".mvm." in name:
        return "mvm"
    if ".mlp." in name:
        return "mlp"
    if ".self_attn." in name:
        return "attention"
    if "norm" in name.rsplit(".", 2)[-2]:
        return "norms"
    return "other"


def _numel(p: nn.Parameter) -> int:
    # Under ZeRO-3 a partitioned parameter is empty locally; DeepSpeed records the full size in ds_numel.
    return int(getattr(p, "ds_numel", p.numel()))


def parameter_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{component: (trainable, frozen)} including a ``total`` row. Tied parameters count once."""
    counts = {c: [0, 0] for c in (*COMPONENTS, "other")}
    for name, p in model.named_parameters():  # named_parameters() de-duplicates tied weights
        counts[component_of(name)][0 if p.requires_grad else 1] += _numel(p)
    rows = {c: (t, f) for c, (t, f) in counts.items() if t or f}
    rows["total"] = (sum(t for t, _ in rows.values()), sum(f for _, f in rows.values()))
    return rows


def _fmt(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def parameter_summary(model: nn.Module) -> str:
    """A table: per component trainable / frozen / total parameters, then the totals."""
    rows = parameter_counts(model)
    lines = [f"{'component':<12}{'trainable':>14}{'frozen':>14}{'total':>14}"]
    for comp, (t, f) in rows.items():
        if comp == "total":
            lines.append("-" * 54)
        lines.append(f"{comp:<12}{_fmt(t):>14}{_fmt(f):>14}{_fmt(t + f):>14}")
    t, f = rows["total"]
    share = 100.0 * t / max(t + f, 1)
    lines.append(f"trainable share: {share:.3f}% ({t:,} of {t + f:,} parameters)")
    return "\n".join(lines)
