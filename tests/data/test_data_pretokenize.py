"""pretokenize: inputs, kinds, Arrow stream output, manifest, determinism, resume, bad input."""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

import mks2.data.pretokenize as pt
from mks2.data.errors import PretokenizeError
from mks2.data.pretokenize import pretokenize
from tests.data.data_helpers import caption_records, text_records, write_images, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def _rows(directory: Path) -> list[dict]:
    manifest = json.loads((directory / "manifest.json").read_text())
    rows = []
    for shard in manifest["shards"]:
        with pa.memory_map(str(directory / shard["file"])) as src:
            rows += pa.ipc.open_stream(src).read_all().to_pylist()
    return rows


def _shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*.arrow"))}


def _run(inputs, out, tok, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("fmt", "caption")
    kw.setdefault("check_images", False)  # most records here name images that are not on disk
    return pretokenize([str(i) for i in inputs], tokenizer=str(tok), output=str(out), **kw)


# --------------------------------------------------------------------------------------------
# Output format
# --------------------------------------------------------------------------------------------


def test_caption_output_pyarrow_datasets_and_manifest(tmp_path, sp_model):
    recs = caption_records(50)
    write_images(tmp_path / "images", 50)
    src = write_jsonl(tmp_path / "cap.jsonl", recs)
    out = tmp_path / "out"
    m = _run([src], out, sp_model, image_root=str(tmp_path / "images"), records_per_shard=20, check_images=True)
    ref = spm.SentencePieceProcessor(model_file=str(sp_model))

    rows = _rows(out)
    assert len(rows) == 50
    for rec, row in zip(recs, rows):
        expected = [1, -200] + ref.encode(rec["caption"]) + [2]
        assert row["input_ids"] == expected
        assert row["loss_mask"] == [0, 0] + [1] * (len(expected) - 2)
        assert row["image"] == rec["image"]

    # HF datasets reads the stream shards
    import datasets

    ds = datasets.Dataset.from_file(str(out / "shard-000001.arrow"))
    assert ds.num_rows == 20 and ds[0]["input_ids"] == rows[20]["input_ids"] and ds[0]["image"] == recs[20]["image"]

    # memory-mapped reads are zero-copy: no Arrow allocation for the shard's data
    before = pa.total_allocated_bytes()
    with pa.memory_map(str(out / "shard-000000.arrow")) as mm:
        table = pa.ipc.open_stream(mm).read_all()
        assert table.num_rows == 20 and pa.total_allocated_bytes() == before
    schema = table.schema
    assert schema.field("input_ids").type == pa.list_(pa.int32())
    assert schema.field("loss_mask").type == pa.list_(pa.int8())
    assert schema.field("image").type == pa.string()

    assert m["format_version"] == 1 and m["kind"] == "caption"
    assert m["tokenizer"]["vocab_size"] == m["vocab_size"] == ref.get_piece_size()
    assert m["tokenizer"]["fingerprint"].startswith("sha256:")
    assert m["counts"]["records_read"] == m["counts"]["records_written"] == 50
    assert m["counts"]["records_skipped"] == 0
    assert m["counts"]["tokens"] == sum(len(r["input_ids"]) for r in rows)
    assert m["counts"]["images"] == 50
    assert [s["rows"] for s in m["shards"]] == [20, 20, 10]
    import hashlib

    for s in m["shards"]:
        assert hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    assert m["max_token_id"] == max(max(r["input_ids"]) for r in rows)
    assert json.loads((out / "manifest.json").read_text()) == m
    assert not (out / ".pretokenize").exists()


def test_input_formats_give_identical_shards(tmp_path, sp_model):
    recs = caption_records(30, seed=3)
    recs[4]["caption"] = 'with "quotes", commas\nand a newline'
    inputs = {
        "jsonl": write_jsonl(tmp_path / "a.jsonl", recs),
        "gz": write_jsonl(tmp_path / "a.jsonl.gz", recs, gz=True),
        "array": tmp_path / "a.json",
        "parquet": tmp_path / "a.parquet",
        "csv": tmp_path / "a.csv",
    }
    inputs["array"].write_text(json.dumps(recs))
    pq.write_table(pa.Table.from_pylist(recs), inputs["parquet"])
    with open(inputs["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption"])
        w.writeheader()
        w.writerows(recs)
    digests = {}
    for name, path in inputs.items():
        m = _run([path], tmp_path / f"out_{name}", sp_model)
        digests[name] = [s["sha256"] for s in m["shards"]]
    assert len({tuple(d) for d in digests.values()}) == 1, digests


def test_several_inputs_and_globs_keep_order(tmp_path, sp_model):
    a = write_jsonl(tmp_path / "part-b.jsonl", [{"text": "second file"}])
    write_jsonl(tmp_path / "part-a.jsonl", [{"text": "first file"}])
    c = write_jsonl(tmp_path / "z.jsonl", [{"text": "named last"}])
    _run([tmp_path / "part-*.jsonl", c, a], tmp_path / "out", sp_model, fmt="text")  # a twice: read once
    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    texts = [ref.decode(r["input_ids"][1:-1]) for r in _rows(tmp_path / "out")]
    assert texts == ["first file", "second file", "named last"]
    with pytest.raises(PretokenizeError, match="matches no file"):
        _run([tmp_path / "nothing-*.jsonl"], tmp_path / "o2", sp_model, fmt="text")


def test_field_names_are_configurable(tmp_path, sp_model):
    src = write_jsonl(tmp_path / "c.jsonl", [{"url": "x.png", "text": "a red star"}])
    _run([src], tmp_path / "out", sp_model, fields={"image": "url", "caption": "text"})
    assert _rows(tmp_path / "out")[0]["image"] == "x.png"
    with pytest.raises(PretokenizeError, match="unknown field 'capton'"):
        _run([src], tmp_path / "o2", sp_model, fields={"capton": "text"})


# --------------------------------------------------------------------------------------------
# Record kinds
# --------------------------------------------------------------------------------------------


def test_instruction_kinds(tmp_path, sp_model):
    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    llava = [
        {  # image, placeholder given, two turns
            "image": "img/1.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat shape"},
                {"from": "gpt", "value": "a circle"},
                {"from": "human", "value": "color"},
                {"from": "gpt", "value": "red"},
            ],
        },
        {"image": "img/2.png", "conversations": [{"from": "human", "value": "what"}, {"from": "gpt", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "yes"}]},
    ]
    _run([write_jsonl(tmp_path / "l.jsonl", llava)], tmp_path / "llava", sp_model, fmt="llava")
    rows = _rows(tmp_path / "llava")
    assert [r["image"] for r in rows] == ["img/1.png", "img/2.png", None]
    ids, mask = np.array(rows[0]["input_ids"]), np.array(rows[0]["loss_mask"])
    assert ids[mask == 1].tolist() == ref.encode("a circle") + [2] + ref.encode("red") + [2]
    assert (ids == -200).sum() == 1 and (ids == 1).sum() == 2  # llama2: one BOS per turn
    # no placeholder in the text -> "<image>\n" goes before the first human message (LLaVA's rule)
    ids2 = rows[1]["input_ids"]
    assert ids2[:2] == [1] + ref.encode("[INST] ")[:1] and -200 in ids2
    assert -200 not in rows[2]["input_ids"]

    alpaca = [
        {"instruction": "name a shape", "input": "", "output": "circle"},
        {"instruction": "color of", "input": "the sky", "output": "blue"},
    ]
    _run(
        [write_jsonl(tmp_path / "a.jsonl", alpaca)],
        tmp_path / "alpaca",
        sp_model,
        fmt="alpaca",
        chat_template="vicuna_v1",
    )
    rows = _rows(tmp_path / "alpaca")
    assert "image" not in rows[0]
    for rec, row in zip(alpaca, rows):
        ids, mask = np.array(row["input_ids"]), np.array(row["loss_mask"])
        assert ids[mask == 1].tolist() == ref.encode(rec["output"]) + [2]
        prompt = ref.decode(ids[mask == 0][1:].tolist())
        assert prompt.endswith("ASSISTANT:") and rec["instruction"] in prompt and rec["input"] in prompt

    _run([write_jsonl(tmp_path / "t.jsonl", text_records(5))], tmp_path / "text", sp_model, fmt="text")
    for rec, row in zip(text_records(5), _rows(tmp_path / "text")):
        assert row["input_ids"] == [1] + ref.encode(rec["text"]) + [2]
        assert row["loss_mask"] == [0] + [1] * (len(row["input_ids"]) - 1)


# --------------------------------------------------------------------------------------------
# Workers, existing outputs, resume
# --------------------------------------------------------------------------------------------


def test_worker_count_gives_byte_identical_output(tmp_path, sp_model):
    recs: list = caption_records(230, seed=1)
    recs[17] = "{broken"  # skipped records must land identically too
    recs[101] = {"image": "x.png"}
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    outs = {}
    for n in (1, 2, 3):
        m = _run([src], tmp_path / f"w{n}", sp_model, workers=n, records_per_shard=37, on_error="skip")
        outs[n] = (_shard_bytes(tmp_path / f"w{n}"), m["shards"], m["counts"], m["skipped_examples"])
    assert len(outs[1][0]) == 7
    assert outs[1] == outs[2] == outs[3]
    assert outs[1][2]["records_skipped"] == 2
    # fail mode with workers: the first bad record in input order is reported, from a worker process
    with pytest.raises(PretokenizeError, match=rf"{src}:18: malformed JSON"):
        _run([src], tmp_path / "fail", sp_model, workers=2, records_per_shard=10)
    assert not (tmp_path / "fail" / "manifest.json").exists()


def test_refuse_resume_and_overwrite(tmp_path, sp_model, monkeypatch):
    src = write_jsonl(tmp_path / "c.jsonl", caption_records(100, seed=2))
    reference = tmp_path / "reference"
    _run([src], reference, sp_model, records_per_shard=20)

    out = tmp_path / "out"
    real = pt.encode_shard
    calls: list[int] = []

    def crash_at_3(settings, tok, index, records):
        if index == 3:
            raise KeyboardInterrupt  # the run dies while shard 3 is being encoded
        return real(settings, tok, index, records)

    monkeypatch.setattr(pt, "encode_shard", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        _run([src], out, sp_model, records_per_shard=20)
    assert not (out / "manifest.json").exists()
    assert sorted(_shard_bytes(out)) == ["shard-000000.arrow", "shard-000001.arrow", "shard-000002.arrow"]

    monkeypatch.setattr(pt, "encode_shard", real)
    with pytest.raises(PretokenizeError, match="unfinished pretokenize run; pass --resume"):
        _run([src], out, sp_model, records_per_shard=20)
    with pytest.raises(PretokenizeError, match="records_per_shard: was 20, now 10"):
        _run([src], out, sp_model, records_per_shard=10, if_exists="resume")

    # corrupt a finished shard: resume must redo it and everything after it
    data = bytearray((out / "shard-000001.arrow").read_bytes())
    data[-20] ^= 0xFF
    (out / "shard-000001.arrow").write_bytes(bytes(data))

    def counting(settings, tok, index, records):
        calls.append(index)
        return real(settings, tok, index, records)

    monkeypatch.setattr(pt, "encode_shard", counting)
    m = _run([src], out, sp_model, records_per_shard=20, if_exists="resume")
    assert calls == [1, 2, 3, 4]
    assert _shard_bytes(out) == _shard_bytes(reference)
    assert m["counts"]["records_read"] == 100

    with pytest.raises(PretokenizeError, match="already holds a complete dataset.*pass --overwrite"):
        _run([src], out, sp_model, records_per_shard=20)
    calls.clear()
    assert _run([src], out, sp_model, records_per_shard=20, if_exists="resume")["shards"] == m["shards"]
    assert calls == []  # complete with the same settings: nothing to do
    m2 = _run([src], out, sp_model, records_per_shard=50, if_exists="overwrite")
    assert len(m2["shards"]) == 2 and sorted(_shard_bytes(out)) == ["shard-000000.arrow", "shard-000001.arrow"]


def test_foreign_output_directory_is_refused(tmp_path, sp_model):
    src = write_jsonl(tmp_path / "c.jsonl", caption_records(3))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(PretokenizeError, match="holds files pretokenize did not write.*notes.txt"):
        _run([src], tmp_path / "out", sp_model, if_exists="overwrite")
    assert (tmp_path / "out" / "notes.txt").exists()


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

GOOD = json.dumps({"image": "a.png", "caption": "a red circle"}).encode()


def _bad_jsonl(tmp_path, bad: bytes) -> Path:
    p = tmp_path / "in.jsonl"
    p.write_bytes(b"\n".join([GOOD, GOOD, bad, GOOD]) + b"\n")
    return p


BAD_LINES = {
    "malformed": (b'{"image": "a.png", "caption": ', "malformed JSON"),
    "missing_field": (json.dumps({"image": "a.png"}).encode(), "missing field 'caption'"),
    "invalid_utf8": (b'{"image": "a.png", "caption": "bad \xff\xfe byte"}', "invalid UTF-8"),
    "wrong_type": (json.dumps({"image": "a.png", "caption": 7}).encode(), "must be a string, got int"),
    "empty": (json.dumps({"image": "a.png", "caption": "  "}).encode(), "field 'caption' is empty"),
    "not_object": (b"[1, 2]", "expected a JSON object"),
    "over_long": (json.dumps({"image": "a.png", "caption": "red " * 200}).encode(), "over-long record"),
    # lines Arrow's JSON reader (the fast path) would accept but json.loads refuses
    "utf8_in_other_field": (b'{"image": "a.png", "caption": "fine", "x": "\xff"}', "invalid UTF-8 at byte 44"),
    "byte_order_mark": (b'\xef\xbb\xbf{"image": "a.png", "caption": "x"}', "malformed JSON (Unexpected UTF-8 BOM"),
    "two_objects": (b'{"image": "a.png", "caption": "x"} {"image": "b.png", "caption": "y"}', "Extra data"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_record_fail_and_skip(tmp_path, sp_model, case):
    line, reason = BAD_LINES[case]
    src = _bad_jsonl(tmp_path, line)
    with pytest.raises(PretokenizeError) as err:
        _run([src], tmp_path / "fail", sp_model, max_tokens=64)
    assert f"{src}:3: " in str(err.value) and reason in str(err.value)
    assert not (tmp_path / "fail" / "manifest.json").exists()

    m = _run([src], tmp_path / "skip", sp_model, max_tokens=64, on_error="skip")
    assert m["counts"]["records_read"] == 4
    assert m["counts"]["records_written"] == 3 and m["counts"]["records_skipped"] == 1
    assert len(m["skipped_examples"]) == 1 and m["skipped_examples"][0].startswith(f"{src}:3: ")
    assert reason in m["skipped_examples"][0]


@pytest.mark.parametrize("gz", [False, True])
def test_line_blocks_hold_exactly_the_records_of_the_file(tmp_path, gz, monkeypatch):
    """The parent's chunked JSONL reader hands out the same (line number, line) records as reading
    the file line by line, cut after exactly ``n`` records, whatever the chunk size."""
    import itertools
    import random

    from mks2.data.records import LineReader, _iter_jsonl, resolve_inputs

    rng = random.Random(0)
    pool = [
        b"",
        b"  ",
        b"\t\r",
        b"\x0b",
        b'{"a": 1}',
        b'{"a": "x y z"}\r',
        b"{broken",
        b'{"long": "' + b"w" * 300 + b'"}',
        b'  {"indented": 1}',  # starts with whitespace, not blank
        b"\x0c",
        b"\x1c",  # not bytes whitespace: a record
    ]
    lines = [rng.choice(pool) for _ in range(400)]
    monkeypatch.setattr(LineReader, "MIN_CHUNK", 64)  # many chunk boundaries inside the requests
    for tail in (b'\n{"last": "no newline"}', b"\n  \t"):  # the file ends in a record or a blank line
        data = b"\n".join(lines) + tail
        path = tmp_path / ("in.jsonl.gz" if gz else "in.jsonl")
        path.write_bytes(gzip.compress(data) if gz else data)
        (f,) = resolve_inputs([str(path)])
        expected = list(_iter_jsonl(f))
        for n, ranges in itertools.product((1, 2, 7, 50, 10_000), (False, True)):
            reader, got, sizes = LineReader(f, 0, ranges=ranges), [], []
            while block := reader.take(n):
                # byte ranges (plain files only) are read back by the worker
                assert (block.offset >= 0 and not block.data) == (ranges and not gz)
                got += list(block.load([f]).lines())
                sizes.append(block.records)
            reader.close()
            assert got == expected, (n, ranges)
            assert all(k == n for k in sizes[:-1]) and 0 < sizes[-1] <= n and sum(sizes) == len(expected)


def test_clean_jsonl_blocks_skip_the_per_record_path(tmp_path, sp_model, monkeypatch):
    """Caption and text records of a clean JSONL block are parsed by Arrow and encoded in one batch; a
    block with one bad record goes record by record and gives the same rows for its good records."""
    import mks2.data.encode as enc

    recs = caption_records(40, seed=5)
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    ref = _run([src], tmp_path / "ref", sp_model, records_per_shard=16)

    def per_record(*args):
        raise AssertionError("the per-record path ran for a clean block")

    monkeypatch.setattr(enc, "_parse_record", per_record)
    fast = _run([src], tmp_path / "fast", sp_model, records_per_shard=16)
    assert _shard_bytes(tmp_path / "fast") == _shard_bytes(tmp_path / "ref") and fast["shards"] == ref["shards"]
    texts = write_jsonl(tmp_path / "t.jsonl", text_records(30))
    _run([texts], tmp_path / "text", sp_model, fmt="text")
    monkeypatch.undo()

    lines = [json.dumps(r) for r in recs[:16]] + ["{broken"] + [json.dumps(r) for r in recs[16:]]
    mixed = _run([write_jsonl(tmp_path / "m.jsonl", lines)], tmp_path / "mixed", sp_model, on_error="skip")
    assert mixed["counts"]["records_skipped"] == 1 and mixed["skipped_examples"][0].startswith(
        f"{tmp_path}/m.jsonl:17:"
    )
    assert _rows(tmp_path / "mixed") == _rows(tmp_path / "ref")


def test_space_lead_bytes_are_those_of_str_isspace():
    from mks2.data.encode import _SPACE_LEAD_BYTES

    spaces = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    assert sorted({c.encode()[0] for c in spaces}) == _SPACE_LEAD_BYTES.tolist()


# image paths each decided on the fast path's byte-level checks: blank ones are bad records, the
# others (leading spaces, non-ASCII, absolute inside/outside the image root) are kept exactly as the
# per-record path keeps them
TRICKY_IMAGES = [
    " ",
    "\u3000",
    "\u2003 \u00a0",
    "\u001c",
    "",
    " a.png",
    "\u00a0b.png",
    "\u2003c.png",
    "\u00e9.png",
    "\t",
    "ROOT/sub/d.png",
    "/elsewhere/e.png",
    "f.png",
]


@pytest.mark.parametrize("with_root", [False, True])
def test_fast_path_judges_image_paths_like_the_per_record_path(tmp_path, sp_model, monkeypatch, with_root):
    import mks2.data.encode as enc

    root = tmp_path / "root"
    root.mkdir()
    recs = caption_records(3 * len(TRICKY_IMAGES), seed=3)
    lines = []
    for k, rec in enumerate(recs):  # one tricky path per block of 3 records
        image = TRICKY_IMAGES[k // 3].replace("ROOT", str(root)) if k % 3 == 1 else rec["image"]
        lines.append(f'{{"image": "{image}", "caption": {json.dumps(rec["caption"])}}}')
    src = write_jsonl(tmp_path / "c.jsonl", lines)
    kw = dict(records_per_shard=3, on_error="skip", image_root=str(root) if with_root else None)
    fast = _run([src], tmp_path / "fast", sp_model, **kw)
    monkeypatch.setattr(enc, "_fast_fixed_block", lambda s, block: None)
    slow = _run([src], tmp_path / "slow", sp_model, **kw)
    assert fast["counts"]["records_skipped"] == 6  # the six blank paths
    assert fast["skipped_examples"] == slow["skipped_examples"]
    assert _shard_bytes(tmp_path / "fast") == _shard_bytes(tmp_path / "slow") and fast["shards"] == slow["shards"]
    images = [r["image"] for r in _rows(tmp_path / "fast")]
    assert ("sub/d.png" in images) == with_root and (f"{root}/sub/d.png" in images) != with_root
    assert " a.png" in images and "/elsewhere/e.png" in images and "\u00e9.png" in images


def test_fast_image_column_stays_arrow_unless_strings_are_needed(tmp_path):
    from mks2.data.encode import EncodeSettings, _fixed_images

    def settings(**kw):
        base = dict(kind="caption", fields={}, template="llama2", system_prompt=None, image_token="<image>")
        base |= dict(image_token_id=-200, image_root=None, check_images=False, max_tokens=None, on_error="skip")
        return EncodeSettings(**(base | dict(files=(), output=str(tmp_path)) | kw))

    col = pa.array(["a.png", "b/c.png"])
    assert _fixed_images(settings(), col) is col
    assert _fixed_images(settings(image_root="/r"), col) is col  # relative paths stay as they are
    assert _fixed_images(settings(image_root="/r"), pa.array(["/r/x.png", "a.png"])) == ["x.png", "a.png"]
    assert _fixed_images(settings(check_images=True), col) == ["a.png", "b/c.png"]
    assert _fixed_images(settings(), pa.array(["a.png", ""])) is None
    assert _fixed_images(settings(), pa.array(["a.png", "\u2028\t"])) is None
    assert _fixed_images(settings(), pa.array(["a.png", "\u2028x"])) is not None


def test_many_bad_records_name_their_lines(tmp_path, sp_model):
    """Every other record over-long, across two files (one shard, two blocks, a blank line): each
    skipped record is named by its own file and line."""
    short, long = (json.dumps({"image": "a.png", "caption": c}) for c in ("a red circle", "red " * 100))
    a = write_jsonl(tmp_path / "a.jsonl", [short if i % 2 else long for i in range(30)])
    b_lines = [short if i % 2 else long for i in range(30)]
    b = write_jsonl(tmp_path / "b.jsonl", b_lines[:3] + [""] + b_lines[3:])
    m = _run([a, b], tmp_path / "o", sp_model, max_tokens=64, on_error="skip", records_per_shard=100)
    assert m["counts"]["records_skipped"] == 30 and m["counts"]["records_written"] == 30
    want = [f"{a}:{n}" for n in range(1, 31, 2)] + [f"{b}:{n}" for n in (1, 3, 6, 8, 10)]
    assert [p.split(": ")[0] for p in m["skipped_examples"]] == want


def test_bad_csv_and_parquet_rows_name_their_location(tmp_path, sp_model):
    p = tmp_path / "in.csv"
    p.write_text('image,caption\na.png,fine\nb.png,"two\nlines"\nc.png,too,many\n')
    with pytest.raises(PretokenizeError, match=rf"{p}:5: malformed CSV row: 3 fields, the header has 2"):
        _run([p], tmp_path / "o1", sp_model)
    t = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([{"image": "a.png", "caption": "x"}, {"image": "b.png", "caption": None}]), t)
    with pytest.raises(PretokenizeError, match=rf"{t}:row 2: missing field 'caption'"):
        _run([t], tmp_path / "o2", sp_model)


def test_check_images(tmp_path, sp_model):
    write_images(tmp_path / "root", 2)
    (tmp_path / "root" / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    recs = [
        {"image": "img/0.png", "caption": "ok"},
        {"image": "img/9.png", "caption": "gone"},
        {"image": "img/broken.png", "caption": "bad"},
        {"image": str(tmp_path / "root/img/1.png"), "caption": "abs"},
    ]
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    with pytest.raises(PretokenizeError, match=rf"{src}:2: image not found: .*img/9.png"):
        _run([src], tmp_path / "o1", sp_model, image_root=str(tmp_path / "root"), check_images=True)
    m = _run([src], tmp_path / "o2", sp_model, image_root=str(tmp_path / "root"), check_images=True, on_error="skip")
    assert m["counts"]["records_written"] == 2
    assert "image cannot be decoded" in m["skipped_examples"][1]
    assert [r["image"] for r in _rows(tmp_path / "o2")] == ["img/0.png", "img/1.png"]  # absolute -> relative
    # with the explicit opt-out the paths are not opened
    assert _run([src], tmp_path / "o3", sp_model, check_images=False)["counts"]["records_written"] == 4
    # the library's default checks, as the CLI does
    with pytest.raises(PretokenizeError, match="image not found"):
        pretokenize([str(src)], fmt="caption", tokenizer=str(sp_model), output=str(tmp_path / "o4"),
                    image_root=str(tmp_path / "root"), progress=False)  # fmt: skip


def test_llava_structure_errors(tmp_path, sp_model):
    bad = {"image": "a.png", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}
    src = write_jsonl(tmp_path / "l.jsonl", [bad])
    with pytest.raises(PretokenizeError, match=r":1: turns 0-1 have roles 'gpt', 'human'"):
        _run([src], tmp_path / "o", sp_model, fmt="llava")
    two = {
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}],
    }
    with pytest.raises(PretokenizeError, match="2 image placeholders"):
        _run([write_jsonl(tmp_path / "l2.jsonl", [two])], tmp_path / "o2", sp_model, fmt="llava")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli(tmp_path, sp_model):
    src = write_jsonl(tmp_path / "c.jsonl", caption_records(40) + ["{oops"])
    cmd = [
        sys.executable,
        str(REPO / "tools/pretokenize.py"),
        "--input",
        str(src),
        "--format",
        "caption",
        "--tokenizer",
        str(sp_model),
        "--output",
        str(tmp_path / "out"),
        "--no-check-images",  # the records name images that do not exist
        "--records-per-shard",
        "16",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"{src}:41: malformed JSON" in r.stderr and "--on-error skip" in r.stderr
    r = subprocess.run([*cmd, "--on-error", "skip", "--resume"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "41 records read, 40 written, 1 skipped" in r.stdout and f"{src}:41" in r.stdout
    assert "rec/s" in r.stderr and "tok/s" in r.stderr  # the progress bar
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["command"][-4:] == ["16", "--on-error", "skip", "--resume"] and m["on_error"] == "skip"
