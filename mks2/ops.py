"""Public ops of the package: ``mome_mix``, the soft-MoME token mixing (DESIGN §1).

A plain re-export of ``mks2_kernels.op`` (the repository's ``kernels/`` folder): its docstrings give the
signature, shapes, dtypes and backends. The model calls ``mks2.ops.mome_mix`` from inside the forward of
the module that owns the router weight, where ZeRO-3 has gathered that weight (see ``mks2_kernels.op``).
"""

from mks2_kernels.op import BACKENDS, mome_mix, resolve_backend

__all__ = ["BACKENDS", "mome_mix", "resolve_backend"]
