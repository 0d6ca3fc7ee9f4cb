"""Where the frozen base lives under the zero3 mode: ZeRO-3-partitioned (``parallel.frozen_base=partition``)
or whole on every GPU (``replicate``, ZeRO-2), read from the parameters themselves after the engine is built.

A ZeRO-3 parameter carries ``ds_id`` (and holds 1/N of its elements, or all of them while gathered); a
replicated one is a plain tensor with every element on every rank. ``check_frozen_base`` raises on the
rank where replicate left a frozen parameter ZeRO-managed (the per-micro-batch gathers would be back), and
returns the one line rank 0 logs, which the tests read.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mks2.config import FrozenBase


@dataclass(frozen=True)
class FrozenBaseReport:
    tensors: int  # frozen parameter tensors of the engine's module
    elements: int  # their full element count
    zero_managed: int  # how many of them DeepSpeed ZeRO-3 partitions (have ``ds_id``)
    local_elements: int  # elements this rank holds of the frozen ones that are not ZeRO-managed

    def line(self, choice: FrozenBase) -> str:
        how = "replicated on every GPU" if self.zero_managed == 0 else "ZeRO-3-partitioned"
        return (
            f"frozen base ({choice.value}): {self.tensors} tensors, {self.elements:,} parameters, {how} "
            f"({self.zero_managed} ZeRO-partitioned, {self.local_elements:,} held whole on this rank)"
        )


def frozen_base_report(module: nn.Module) -> FrozenBaseReport:
    tensors = elements = managed = local = 0
    for p in module.parameters():
        if p.requires_grad:
            continue
        tensors += 1
        elements += int(getattr(p, "ds_numel", p.numel()))
        if hasattr(p, "ds_id"):
            managed += 1
        else:
            local += p.numel()
    return FrozenBaseReport(tensors, elements, managed, local)


def check_frozen_base(module: nn.Module, choice: FrozenBase) -> str:
    """The log line for ``module`` (the engine's module); raises RuntimeError if ``replicate`` did not hold."""
    report = frozen_base_report(module)
    if choice == FrozenBase.REPLICATE and (report.zero_managed or report.local_elements != report.elements):
        raise RuntimeError(f"parallel.frozen_base=replicate did not hold: {report.line(choice)}")
    return report.line(choice)
