"""mks2_kernels: fused soft-MoME token mixing (Triton + CUDA C++), its autograd op and benchmarks.

Installed from the repository's ``kernels/`` folder under the import name ``mks2_kernels`` (a
package named ``kernels`` would be mistaken for the PyPI package that ``transformers`` probes).
Use it as ``mks2.ops.mome_mix``; ``python kernels/bench.py`` is the benchmark harness.
Importing this package imports neither triton nor the CUDA extension: each backend loads on first use.
"""

from mks2_kernels.op import BACKENDS, mome_mix, resolve_backend

__all__ = ["BACKENDS", "mome_mix", "resolve_backend"]
