"""Loaded by every rank of a test launch that puts this directory first on PYTHONPATH: counts the bytes each
rank reads from files under ``$MKS2_IO_PROBE_DIR`` (through ``open``: how mks2 reads safetensors) and writes
``{path: bytes}`` to ``$MKS2_IO_PROBE_OUT/rank_<RANK>.json`` at exit. Test instrumentation only."""

import atexit
import builtins
import json
import os

_WATCH = os.environ.get("MKS2_IO_PROBE_DIR")
_OUT = os.environ.get("MKS2_IO_PROBE_OUT")

if _WATCH and _OUT:
    _counts: dict[str, int] = {}
    _real_open = builtins.open

    class _Counting:
        def __init__(self, fh, path):
            self._fh, self._path = fh, path

        def _add(self, n):
            _counts[self._path] = _counts.get(self._path, 0) + (n or 0)
            return n

        def read(self, *a):
            data = self._fh.read(*a)
            self._add(len(data))
            return data

        def readinto(self, buf):
            return self._add(self._fh.readinto(buf))

        def __enter__(self):
            self._fh.__enter__()
            return self

        def __exit__(self, *exc):
            return self._fh.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self._fh, name)

    def _open(file, *args, **kwargs):
        fh = _real_open(file, *args, **kwargs)
        path = os.fspath(file) if isinstance(file, (str, bytes, os.PathLike)) else None
        if isinstance(path, str) and os.path.abspath(path).startswith(_WATCH):
            return _Counting(fh, os.path.abspath(path))
        return fh

    builtins.open = _open

    @atexit.register
    def _write():
        rank = os.environ.get("RANK")
        if rank is None:  # the launcher's own processes (they read no weights)
            return
        with _real_open(os.path.join(_OUT, f"rank_{rank}.json"), "w") as fh:
            json.dump(_counts, fh)
