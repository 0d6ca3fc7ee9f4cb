#!/usr/bin/env python
"""Loader benchmark: random-access samples/s and peak RSS of PretokenizedDataset.

Builds two pretokenized datasets of 512-token samples (default ~100 MB and ~2 GB of shards) in a
scratch directory with the real shard writer, then, for each dataset and access mode (``read``:
positioned reads, the loader's default; ``view``: zero-copy views of the mapping with RSS release), in
a fresh process: reads its files once (warm page cache), opens it (hash verification off), reads
``--accesses`` samples at uniformly random indices, copying each out (as collation does), and reports
samples/s and RSS; then the same samples through the collator. Targets (issue #3): >= 50,000
samples/s in one process, and a peak-RSS growth under 64 MiB from the small to the large dataset.

    python tools/bench_loader.py --workdir /tmp/mks2_bench_loader [--small-mb 100 --large-mb 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SAMPLE_TOKENS = 512


def build(directory: Path, megabytes: int, *, rows_per_shard: int = 16384, seed: int = 0) -> dict:
    """A dataset of ~``megabytes`` MB of 512-token samples, written with the library's shard writer."""
    from mks2.data.shards import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, serialize_shard, sha256_bytes, shard_name

    if (directory / MANIFEST_NAME).is_file():
        return json.loads((directory / MANIFEST_NAME).read_text())
    directory.mkdir(parents=True, exist_ok=True)
    per_row = SAMPLE_TOKENS * 5 + 8  # int32 ids + int8 mask + offsets
    rows_total = megabytes * 2**20 // per_row
    rng = np.random.default_rng(seed)
    shards, done = [], 0
    while done < rows_total:
        n = min(rows_per_shard, rows_total - done)
        lengths = np.full(n, SAMPLE_TOKENS, dtype=np.int64)
        values = rng.integers(3, 32000, size=n * SAMPLE_TOKENS, dtype=np.int32)
        mask = np.ones(n * SAMPLE_TOKENS, dtype=np.int8)
        data = serialize_shard(lengths, values, mask, None)
        name = shard_name(len(shards))
        (directory / name).write_bytes(data)
        shards.append(
            {
                "file": name,
                "rows": n,
                "tokens": int(n * SAMPLE_TOKENS),
                "bytes": len(data),
                "sha256": sha256_bytes(data),
            }
        )
        done += n
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": "text",
        "tokenizer": {
            "fingerprint": "sha256:synthetic",
            "vocab_size": 32000,
            "bos_id": 1,
            "eos_id": 2,
            "pad_id": None,
            "path": "synthetic",
        },
        "vocab_size": 32000,
        "max_token_id": 31999,
        "image_token": "<image>",
        "image_token_id": -200,
        "image_root": None,
        "shards": shards,
        "counts": {"records_read": done, "records_written": done, "records_skipped": 0, "tokens": done * SAMPLE_TOKENS},
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    return manifest


def _rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    return out


def measure(directory: str, accesses: int, views_only: bool, access: str) -> dict:
    """Runs in a fresh process: open, random access, report."""
    import gc

    from mks2.data.dataset import PretokenizedDataset

    # Warm the page cache (plain reads: adds nothing to RSS), so the figure measures the loader and not the
    # disk; with a dataset larger than RAM the disk's random-read rate bounds any loader.
    for shard in sorted(Path(directory).glob("shard-*.arrow")):
        with open(shard, "rb") as f:
            while f.read(8 << 20):
                pass
    base = _rss()
    ds = PretokenizedDataset(directory, verify_hashes=False, access=access)
    n = len(ds)
    idx = np.random.default_rng(1).integers(0, n, size=accesses).tolist()
    for i in idx[:1000]:  # warm-up: imports, first faults
        ds[i]
    gc.collect()
    t0 = time.perf_counter()
    tokens = 0
    if views_only:  # returns views; the sample's pages are never read
        for i in idx:
            tokens += len(ds[i]["input_ids"])
    else:  # copies each sample out of the mapping, as collation does
        for i in idx:
            s = ds[i]
            tokens += len(np.array(s["input_ids"])) + 0 * len(np.array(s["loss_mask"]))
    dt = time.perf_counter() - t0
    end = _rss()
    peak = end["VmHWM"]  # before the collation stage below imports torch (~200 MB of libraries)
    # the same random samples through the collator (seq_len 512, no packing, batch 8): rows/s to tensors
    from mks2.data.collate import Collator

    collate = Collator(seq_len=SAMPLE_TOKENS)
    rows = [[dict(ds[i], pixel_values=None)] for i in idx[: min(accesses, 40_000)]]
    t1 = time.perf_counter()
    for b in range(0, len(rows), 8):
        collate(rows[b : b + 8])
    collated = len(rows) / (time.perf_counter() - t1)
    return {
        "samples": n,
        "accesses": accesses,
        "seconds": dt,
        "samples_per_s": accesses / dt,
        "collated_rows_per_s": collated,
        "tokens_per_sample": tokens / accesses,
        "rss_start": base["VmRSS"],
        "rss_end": end["VmRSS"],
        "rss_anon_end": end["RssAnon"],
        "rss_file_end": end["RssFile"],
        "peak_rss": peak,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/mks2_bench_loader")
    p.add_argument("--small-mb", type=int, default=100)
    p.add_argument("--large-mb", type=int, default=2048)
    p.add_argument("--accesses", type=int, default=300_000)
    p.add_argument("--views-only", action="store_true", help="do not copy samples out of the mapping")
    p.add_argument(
        "--access",
        nargs="+",
        default=["read", "view"],
        choices=["read", "view"],
        help="PretokenizedDataset access modes to measure (the loader uses read)",
    )
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: child process mode
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.accesses, args.views_only, args.access[0])))
        return 0
    work = Path(args.workdir)
    results: dict[tuple[str, str], dict] = {}
    for label, mb in (("small", args.small_mb), ("large", args.large_mb)):
        t0 = time.perf_counter()
        m = build(work / f"{label}_{mb}mb", mb)
        size = sum(s["bytes"] for s in m["shards"])
        print(
            f"[{label}] {size / 2**20:,.0f} MiB in {len(m['shards'])} shards, "
            f"{m['counts']['records_written']:,} samples of {SAMPLE_TOKENS} tokens "
            f"(ready in {time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
        for access in args.access:
            cmd = [
                sys.executable,
                __file__,
                "--measure",
                str(work / f"{label}_{mb}mb"),
                "--accesses",
                str(args.accesses),
                "--access",
                access,
            ]
            if args.views_only:
                cmd.append("--views-only")
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            results[label, access] = r
            print(
                f"[{label}, access={access}] {r['samples_per_s']:,.0f} samples/s ({r['accesses']:,} random "
                f"accesses in {r['seconds']:.2f} s); RSS start {r['rss_start'] / 2**20:.1f} MiB, end "
                f"{r['rss_end'] / 2**20:.1f} MiB (anon {r['rss_anon_end'] / 2**20:.1f}, file-backed "
                f"{r['rss_file_end'] / 2**20:.1f}), peak {r['peak_rss'] / 2**20:.1f} MiB; collated into "
                f"512-token rows: {r['collated_rows_per_s']:,.0f} rows/s",
                flush=True,
            )
    for access in args.access:
        small, large = results["small", access], results["large", access]
        growth = (large["peak_rss"] - small["peak_rss"]) / 2**20
        slowest = min(small["samples_per_s"], large["samples_per_s"])
        print(
            f"access={access}: peak RSS growth small -> large {growth:+.1f} MiB (target < 64 MiB): "
            f"{'OK' if growth < 64 else 'MISSED'}; slowest {slowest:,.0f} samples/s (target >= 50,000): "
            f"{'OK' if slowest >= 50_000 else 'MISSED'}"
        )
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
