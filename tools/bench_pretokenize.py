#!/usr/bin/env python
"""Pretokenize throughput benchmark: tools/pretokenize with 1 and 2 workers vs the raw tokenizer.

Builds, in a scratch directory (not the repo), a ~200 MB JSONL corpus of English prose (docstring
paragraphs of the Python standard library, shuffled into documents with a fixed seed) and a 32k-piece
Llama-style BPE sentencepiece model trained on part of it. Then measures, in tokens/s:

- raw: the same sentencepiece model encoding the same texts in a plain single-process loop
  (``encode(batch, num_threads=1)`` -- sentencepiece would otherwise use every core), texts already in
  memory: the practical single-core limit;
- ``pretokenize(..., workers=N)`` end to end (read JSONL, parse, encode, build Arrow shards, hash,
  write, manifest) for each N in ``--workers``.

Target (issue #3): pretokenize >= 0.85 x N x raw.

    python tools/bench_pretokenize.py --workdir /tmp/mks2_bench_pretok [--corpus-mb 200 --workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import sysconfig
import time
from pathlib import Path

from mks2.demo.tokenizer import train_sentencepiece
from mks2.fileio import atomic_open, atomic_write_bytes


def harvest_paragraphs() -> list[str]:
    """English paragraphs from the docstrings of the standard library (deterministic per Python)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paras: list[str] = []
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for doc in re.findall(r'"""(.*?)"""', text, flags=re.S):
            for para in re.split(r"\n\s*\n", doc):
                para = " ".join(para.split())
                letters = sum(c.isalpha() or c == " " for c in para)
                if len(para) >= 60 and letters > 0.85 * len(para):
                    paras.append(para)
    return paras


def build_corpus(path: Path, megabytes: int, seed: int = 0) -> int:
    if path.is_file():
        return sum(1 for _ in open(path, "rb"))
    paras = harvest_paragraphs()
    rng = random.Random(seed)
    target, size, docs = megabytes * 10**6, 0, 0
    with atomic_open(path, "w") as f:  # a corpus cut short by ^C is never reused as complete
        while size < target:
            doc = "\n\n".join(rng.choice(paras) for _ in range(rng.randint(1, 8)))
            line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode())
            docs += 1
    return docs


def train_tokenizer(path: Path, corpus: Path, vocab_size: int) -> None:
    """The project's Llama-style recipe (``mks2.demo.tokenizer``) on a 200k-sentence sample of the first
    20k documents, with every core (the benchmark does not need a reproducible model)."""
    if path.is_file():
        return

    def sentences():
        with open(corpus, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= 20_000:
                    return
                yield json.loads(line)["text"]

    model = train_sentencepiece(
        sentences(),
        vocab_size=vocab_size,
        pad_id=-1,
        num_threads=os.cpu_count() or 1,
        input_sentence_size=200_000,
        max_sentence_length=1 << 16,
    )
    atomic_write_bytes(path, model)


def raw_rate(model: Path, corpus: Path) -> tuple[float, int, float]:
    """(tokens/s, tokens, seconds) of a plain single-process encode loop over the corpus texts."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model), num_threads=1)
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tokens, t0 = 0, time.perf_counter()
    for i in range(0, len(texts), 1000):
        tokens += sum(map(len, sp.encode(texts[i : i + 1000], num_threads=1)))
    dt = time.perf_counter() - t0
    return tokens / dt, tokens, dt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/mks2_bench_pretok")
    p.add_argument("--corpus-mb", type=int, default=200)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--records-per-shard", type=int, default=5000)
    args = p.parse_args()

    from mks2.data.pretokenize import pretokenize

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus, model = work / f"corpus_{args.corpus_mb}mb.jsonl", work / f"sp{args.vocab_size}.model"
    t0 = time.perf_counter()
    docs = build_corpus(corpus, args.corpus_mb)
    train_tokenizer(model, corpus, args.vocab_size)
    print(
        f"corpus {corpus} ({corpus.stat().st_size / 1e6:.0f} MB, {docs:,} documents), tokenizer {model} "
        f"(ready in {time.perf_counter() - t0:.0f} s)",
        flush=True,
    )

    raw, raw_tokens, raw_s = raw_rate(model, corpus)
    print(
        f"raw sentencepiece, 1 process, num_threads=1: {raw:,.0f} tokens/s ({raw_tokens:,} tokens in {raw_s:.1f} s)",
        flush=True,
    )
    for n in args.workers:
        out = work / f"out_w{n}"
        shutil.rmtree(out, ignore_errors=True)
        t1 = time.perf_counter()
        m = pretokenize(
            [str(corpus)],
            fmt="text",
            tokenizer=str(model),
            output=str(out),
            workers=n,
            records_per_shard=args.records_per_shard,
            progress=False,
        )
        dt = time.perf_counter() - t1
        # raw counts text tokens only; pretokenize adds BOS/EOS per document
        text_tokens = m["counts"]["tokens"] - 2 * m["counts"]["records_written"]
        assert text_tokens == raw_tokens, (text_tokens, raw_tokens)
        rate = text_tokens / dt
        target = 0.85 * n * raw
        print(
            f"pretokenize --workers {n}: {rate:,.0f} tokens/s in {dt:.1f} s = {rate / raw:.2f} x raw "
            f"(target >= {0.85 * n:.2f} x raw = {target:,.0f}): {'OK' if rate >= target else 'MISSED'}",
            flush=True,
        )
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
