"""Tokenizer loading with one encode interface for sentencepiece models and HF tokenizer directories.

``load_tokenizer(path)`` accepts:

- a sentencepiece model file (Llama's ``tokenizer.model``);
- a local HF tokenizer directory. When it holds a ``tokenizer.model`` we encode with sentencepiece on
  that file: transformers 5's ``LlamaTokenizer`` differs from sentencepiece on leading spaces and parses
  ``</s>``/``<s>`` written in plain text as special tokens (a prompt-injection hazard), so the
  sentencepiece model is the reference for Llama. Other directories (``tokenizer.json`` only, e.g. BPE
  tokenizers) go through ``AutoTokenizer`` with special-token parsing disabled.

``encode`` never adds BOS/EOS: the record formats place them explicitly, as Llama's chat code does.
The fingerprint is the sha256 over the tokenizer files that determine the encoding (for the
sentencepiece route: the model file alone, so a ``tokenizer.model`` and the HF directory holding it
fingerprint the same).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mks2.data.errors import DataError

if TYPE_CHECKING:
    import numpy as np

# Files of an HF tokenizer directory that change how text is encoded (fingerprinted in this order).
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fingerprint(files: dict[str, str]) -> str:
    """sha256 over ``name:sha256`` lines of the files, sorted by name."""
    text = "".join(f"{name}:{digest}\n" for name, digest in sorted(files.items()))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def flatten_ids(encoded: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Id lists -> (token count of each int64 [N], all ids concatenated int32 [sum counts])."""
    import numpy as np

    counts = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(counts.sum()))
    return counts, ids


def frame_ids(counts: np.ndarray, ids: np.ndarray, bos_id: int, eos_id: int) -> np.ndarray:
    """Concatenated ids of texts (``counts`` int64 [N], ``ids`` int32 [sum counts]) -> each text as
    ``BOS ids EOS``, concatenated: int32 [sum counts + 2 N]."""
    import numpy as np

    ends = np.cumsum(counts + 2)  # [N] one past each EOS
    starts = ends - (counts + 2)
    framed = np.empty(len(ids) + 2 * len(counts), dtype=np.int32)
    is_text = np.ones(len(framed), dtype=bool)
    is_text[starts] = False
    is_text[ends - 1] = False
    framed[is_text] = ids
    framed[starts] = bos_id
    framed[ends - 1] = eos_id
    return framed


class Tokenizer:
    """Uniform interface. Attributes: ``path``, ``backend`` (``sentencepiece`` or ``hf``),
    ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id`` (None when the tokenizer has none),
    ``files`` (name -> sha256) and ``fingerprint``."""

    path: str
    backend: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int | None
    files: dict[str, str]

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.files)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_arrays(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``encode_batch`` flattened: (token count of each text int64 [N], the ids of all texts
        concatenated int32 [sum counts])."""
        return flatten_ids(self.encode_batch(texts))

    def encode_framed(
        self, texts: Sequence[str], chunks: Sequence[tuple[int, int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each text as ``BOS ids EOS``: (token count of each text without BOS/EOS int64 [N], the
        framed texts concatenated int32 [sum counts + 2 N]). ``chunks``: ``(lo, hi)`` ranges of
        ``texts`` covering it in order, one tokenizer call each (default: one call)."""
        import numpy as np

        parts = [self.encode_arrays(texts[lo:hi]) for lo, hi in chunks or [(0, len(texts))]]
        counts = np.concatenate([c for c, _ in parts]) if parts else np.zeros(0, np.int64)
        ids = np.concatenate([i for _, i in parts]) if parts else np.zeros(0, np.int32)
        return counts, frame_ids(counts, ids, self.bos_id, self.eos_id)

    def decode(self, ids: Sequence[int]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The manifest's ``tokenizer`` entry."""
        return {
            "path": self.path,
            "backend": self.backend,
            "fingerprint": self.fingerprint,
            "files": dict(sorted(self.files.items())),
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }


class SentencePieceTokenizer(Tokenizer):
    backend = "sentencepiece"

    def __init__(self, model_file: str | Path, *, display_path: str | None = None):
        import sentencepiece as spm

        model_file = Path(model_file)
        # num_threads=1: batch encoding would otherwise use every core, which oversubscribes the CPU
        # when pretokenize runs one process per core (and skews single-core benchmarks).
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(model_file), num_threads=1)
        except (OSError, RuntimeError) as exc:
            raise DataError(f"{model_file}: not a readable sentencepiece model ({exc})") from exc
        self.path = display_path or str(model_file)
        self._model_file = str(model_file)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else None
        if self.bos_id < 0 or self.eos_id < 0:
            raise DataError(f"{model_file}: the sentencepiece model defines no BOS/EOS ids (Llama's has 1 and 2)")
        # Keyed by a fixed name: the same model fingerprints the same wherever it lies and however named.
        self.files = {"tokenizer.model": file_sha256(model_file)}
        self._buffers = self._buffer_encoder()

    def _buffer_encoder(self):
        """sentencepiece's batch encoder that returns each text's ids as an int32 buffer (the pybind
        builds, e.g. 0.2.3) instead of a list of Python ints, or None where this build lacks it or
        disagrees with ``encode`` on a probe. Its public form (``out_type="numpy"``) wraps every buffer in its own
        array, which costs more than it saves on short captions; the buffers are joined in one copy.
        ``encode(texts, framed)``: with ``framed`` sentencepiece itself puts BOS before and EOS after
        each text's ids."""
        method = getattr(getattr(self._sp, "_processor", None), "_EncodeAsBufferBatch", None)
        if method is None:
            return None
        probe = ["Hello world, a probe.", "", "zz \u00e9\u00e8 9"]

        # arguments: texts, num_threads, thread_pool, enable_sampling, nbest_size, alpha, add_bos,
        # add_eos, reverse (sentencepiece_pybind.cc)
        def encode(texts: list[str], framed: bool = False) -> list[Any]:
            return method(texts, 1, None, False, -1, 0.0, framed, framed, False)

        try:
            got = [memoryview(b).cast("B").cast("i").tolist() for b in encode(probe)]
            got_framed = [memoryview(b).cast("B").cast("i").tolist() for b in encode(probe, True)]
        except Exception:  # a build whose private signature differs: use the public list API
            return None
        want = self._sp.encode(probe, num_threads=1)
        ok = got == want and got_framed == [[self.bos_id, *ids, self.eos_id] for ids in want]
        return encode if ok else None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=1)

    def encode_arrays(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if self._buffers is None or not texts:
            return super().encode_arrays(texts)
        import numpy as np

        views = list(map(memoryview, self._buffers(list(texts))))  # int32 [n_i] each
        counts = np.fromiter(map(len, views), dtype=np.int64, count=len(views))
        return counts, np.frombuffer(b"".join(views), dtype=np.int32)

    def encode_framed(
        self, texts: Sequence[str], chunks: Sequence[tuple[int, int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """sentencepiece adds BOS/EOS and each call's buffers are joined at once (while in cache,
        and freed before the next call: joining a whole shard's at the end cost ~50% more), without
        a memoryview and a length per text (~15% of the time outside the tokenizer on short
        captions): the counts come from the EOS positions, which are exactly the framing EOS when the
        ids hold N of them (a text may encode to the EOS id only under a model that makes it an
        ordinary piece; the lengths are then read from the buffers)."""
        if self._buffers is None or not texts:
            return super().encode_framed(texts, chunks)
        import numpy as np

        parts = [self._framed_chunk(list(texts[lo:hi])) for lo, hi in chunks or [(0, len(texts))]]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([c for c, _ in parts]), np.concatenate([f for _, f in parts])

    def _framed_chunk(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        buffers = self._buffers(texts, True)  # int32 [n_i + 2] each
        framed = np.frombuffer(b"".join(buffers), dtype=np.int32)
        ends = np.flatnonzero(framed == self.eos_id)  # [N] position of each EOS
        if len(ends) == len(buffers):
            counts = np.diff(ends, prepend=-1) - 2
        else:
            counts = np.fromiter(map(len, map(memoryview, buffers)), dtype=np.int64, count=len(buffers)) - 2
        return counts, framed

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __reduce__(self):  # the C++ processor does not pickle; reload from the file instead
        return (SentencePieceTokenizer, (self._model_file,), {"path": self.path})


class HFTokenizer(Tokenizer):
    backend = "hf"

    def __init__(self, directory: str | Path):
        from transformers import AutoTokenizer

        directory = Path(directory)
        try:
            self._tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as exc:  # transformers raises many types for unreadable dirs
            raise DataError(f"{directory}: cannot load an HF tokenizer from this directory ({exc})") from exc
        self.path = str(directory)
        self._dir = str(directory)
        self.vocab_size = len(self._tok)
        bos, eos = self._tok.bos_token_id, self._tok.eos_token_id
        if bos is None or eos is None:
            raise DataError(f"{directory}: the tokenizer defines no BOS/EOS token (bos={bos}, eos={eos})")
        self.bos_id, self.eos_id = int(bos), int(eos)
        self.pad_id = self._tok.pad_token_id
        self.files = {n: file_sha256(directory / n) for n in HF_TOKENIZER_FILES if (directory / n).is_file()}

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # split_special_tokens: '</s>' typed in a caption is text, not an end-of-sequence marker.
        out = self._tok(list(texts), add_special_tokens=False, split_special_tokens=True)
        return [list(x) for x in out["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def __reduce__(self):
        return (HFTokenizer, (self._dir,))


def _tokenizer_files(path: Path) -> tuple[str, Path]:
    """Return (backend, file or dir to load) for a tokenizer path, or raise a DataError saying why not."""
    if path.is_file():
        return "sentencepiece", path
    if path.is_dir():
        if (path / "tokenizer.model").is_file():
            return "sentencepiece", path / "tokenizer.model"
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            return "hf", path
        raise DataError(
            f"{path}: directory holds no tokenizer (expected tokenizer.model, tokenizer.json or tokenizer_config.json)"
        )
    raise DataError(f"tokenizer not found: {path}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a sentencepiece model file or a local HF tokenizer directory (see the module docstring)."""
    p = Path(path).expanduser()
    backend, target = _tokenizer_files(p)
    if backend == "sentencepiece":
        return SentencePieceTokenizer(target, display_path=str(p))
    return HFTokenizer(target)


def tokenizer_fingerprint(path: str | Path) -> str:
    """Fingerprint of a tokenizer path without loading it (same value as ``load_tokenizer(path).fingerprint``)."""
    p = Path(path).expanduser()
    backend, target = _tokenizer_files(p)
    if backend == "sentencepiece":
        return _fingerprint({"tokenizer.model": file_sha256(target)})
    return _fingerprint({n: file_sha256(target / n) for n in HF_TOKENIZER_FILES if (target / n).is_file()})
