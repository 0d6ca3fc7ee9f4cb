#!/usr/bin/env python
"""Pretokenize raw records into memory-mapped Arrow shards for mks2 training.

Examples::

    # image-caption pairs (stage 1), two workers, bad records skipped and listed
    python tools/pretokenize.py --input 'cc3m/*.jsonl.gz' --format caption --tokenizer llama2/tokenizer.model \\
        --output data/cc3m_tok --image-root cc3m/images --workers 2 --on-error skip

    # LLaVA conversations with the Vicuna v1 template, caption field named differently
    python tools/pretokenize.py --input llava_instruct_150k.json --format llava --chat-template vicuna_v1 \\
        --tokenizer llama2/ --output data/llava_tok --image-root coco/train2017

Field names are set with ``--field NAME=COLUMN`` (e.g. ``--field caption=text``). Re-running into an
existing output refuses unless ``--resume`` (continue at the first missing shard) or ``--overwrite``.
Exit status: 0 on success, 2 for bad arguments, input or an existing output.
"""

from __future__ import annotations

import argparse
import sys

from mks2.data.chat import TEMPLATES
from mks2.data.errors import DataError
from mks2.data.formats import DEFAULT_FIELDS, KINDS
from mks2.data.pretokenize import DEFAULT_RECORDS_PER_SHARD, pretokenize, summary


def _field(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=COLUMN, got {text!r}")
    name, column = text.split("=", 1)
    return name.strip(), column.strip()


def build_parser() -> argparse.ArgumentParser:
    fields_help = "; ".join(f"{k}: {', '.join(f'{n}={c}' for n, c in v.items())}" for k, v in DEFAULT_FIELDS.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="FILE_OR_GLOB",
        help="JSONL (.jsonl/.json, optionally .gz; a .json file may hold one JSON array), Parquet, CSV/TSV",
    )
    p.add_argument("--format", required=True, choices=KINDS, help="record kind")
    p.add_argument("--tokenizer", required=True, help="sentencepiece model file or local HF tokenizer directory")
    p.add_argument("--output", required=True, help="output directory (shards + manifest.json)")
    p.add_argument("--workers", type=int, default=1, help="encoding processes (output is identical for any N)")
    p.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="bad record: stop with file:line (default) or skip, count and list it",
    )
    p.add_argument("--image-root", help="directory the image paths are relative to")
    p.add_argument(
        "--check-images",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="verify that every image (caption and llava records) exists and decodes (default; "
        "--no-check-images skips it, and a missing image then fails the training step that meets it)",
    )
    p.add_argument(
        "--field",
        type=_field,
        action="append",
        default=[],
        metavar="NAME=COLUMN",
        help=f"rename an input field. Defaults: {fields_help}",
    )
    p.add_argument("--chat-template", choices=TEMPLATES, default="llama2", help="template of llava/alpaca records")
    p.add_argument("--system-prompt", default=None, help="system prompt of instruction records")
    p.add_argument("--max-tokens", type=int, default=None, help="records with more tokens are bad records")
    p.add_argument(
        "--records-per-shard",
        type=int,
        default=DEFAULT_RECORDS_PER_SHARD,
        help="input records per shard (default %(default)s)",
    )
    p.add_argument("--image-token", default="<image>", help="image placeholder in text (default %(default)s)")
    p.add_argument(
        "--image-token-id",
        type=int,
        default=-200,
        help="id stored for the placeholder; must match model.vision.image_token_id (default %(default)s)",
    )
    exists = p.add_mutually_exclusive_group()
    exists.add_argument("--resume", action="store_true", help="continue an unfinished run at its first missing shard")
    exists.add_argument("--overwrite", action="store_true", help="delete a previous run's output first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = pretokenize(
            args.input,
            fmt=args.format,
            tokenizer=args.tokenizer,
            output=args.output,
            workers=args.workers,
            on_error=args.on_error,
            image_root=args.image_root,
            fields=dict(args.field),
            chat_template=args.chat_template,
            max_tokens=args.max_tokens,
            check_images=args.check_images,
            if_exists="resume" if args.resume else "overwrite" if args.overwrite else "refuse",
            records_per_shard=args.records_per_shard,
            system_prompt=args.system_prompt,
            image_token=args.image_token,
            image_token_id=args.image_token_id,
            progress=not args.no_progress,
            command=[sys.executable, *sys.argv] if argv is None else ["tools/pretokenize.py", *argv],
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(manifest))
    print(f"wrote {args.output}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
