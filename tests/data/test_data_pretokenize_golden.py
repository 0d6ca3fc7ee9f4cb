"""pretokenize output pinned byte for byte: shard sha256s and a manifest content hash for fixed inputs
of every record kind and input format, with awkward and bad records in them, for ``workers`` 1 and 2.

The golden values were computed with the per-record implementation that preceded the batched one
(as of commit a96ad0c); any change to the bytes pretokenize writes (or to which records it skips and why)
shows up here. The tokenizer is trained by the data tests' recipe with ``num_threads=1``, which is
reproducible; its own hash is pinned first so that a sentencepiece upgrade that changes training is
reported as such and not as a pretokenize regression.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mks2.data.pretokenize import pretokenize
from tests.data.data_helpers import WORDS, caption_records, text_records, train_sentencepiece, write_images

TOKENIZER_SHA256 = "4ad2b0bd1df69082ba247689a9ceef46ba9654bb6fc415b6ff800c26adc075e0"

# JSONL lines that a JSON parser may treat differently from Python's ``json.loads`` (which decides
# what is a bad record): each must be handled exactly as the per-record implementation did.
AWKWARD_CAPTION_LINES: list[bytes] = [
    b'{"image": "a.png", "caption": "lone surrogate \\ud800 here"}',
    b'{"image": "a.png", "caption": "pair \\ud83d\\ude00 smile"}',
    b'{"image": "a.png", "caption": "first", "caption": "duplicate key wins"}',
    b'{"image": "a.png", "caption": "raw\ttab inside a string"}',
    b'{"image": "a.png", "caption": "crlf line end"}\r',
    b"   \t ",  # whitespace only: not a record
    b'{"image": "a.png", "caption": "nan elsewhere", "score": NaN}',
    b'{"image": "a.png", "caption": "extra fields", "n": 12345678901234567890123, "o": {"x": [1, 2]}}',
    b'{"image": "a.png", "caption": null}',
    b'{"image": "a.png", "caption": 7}',
    b'{"image": "a.png", "caption": ["a", "list"]}',
    b'{"image": "a.png", "caption": "  \\u3000  "}',
    '{"image": "a.png", "caption": "\u3000 unicode spaces \x1c\u2003"}'.encode(),
    b'\xef\xbb\xbf{"image": "a.png", "caption": "byte order mark"}',
    b'{"image": "a.png", "caption": "two"} {"image": "b.png", "caption": "objects"}',
    b'{"image": "a.png", "caption": "trailing comma",}',
    b'[{"image": "a.png", "caption": "array"}]',
    b'{"image": "a.png", "caption": "bad \xff byte"}',
    b'{"image": "a.png", "caption": "escaped \\"quote\\" and \\\\ backslash \\/ slash \\n newline"}',
    b'{"image": 5, "caption": "image not a string"}',
    b'{"caption": "no image"}',
    b'{"image": "", "caption": "empty image"}',
    b'{"image": "a.png", "caption": "nul \\u0000 char"}',
    b'{"image": "a.png", "caption": "over long ' + b"red " * 80 + b'"}',
    b"\x0c",  # form feed only: bytes.strip() calls it blank
    b'{"image": "a.png", "caption": "comment"} // trailing',
    b'{"image": "a.png", "caption": "ok again"}',
]


def _jsonl(path: Path, lines: list[bytes], *, gz: bool = False) -> Path:
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def _dump(records: list) -> list[bytes]:
    return [json.dumps(r).encode() for r in records]


def _dump_ascii_false(records: list) -> list[bytes]:
    return [json.dumps(r, ensure_ascii=False).encode() for r in records]


def build_inputs(root: Path) -> dict[str, list[Path]]:
    """Inputs per record kind (several files each, so shards span file boundaries)."""
    root.mkdir(parents=True, exist_ok=True)
    write_images(root, 20)  # img/0.png .. img/19.png exist; the records name more
    (root / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    caps = caption_records(60, seed=11)
    caps[5]["image"] = "img/broken.png"
    caps[3]["caption"] = "emoji \U0001f600 and accents \u00e9\u00e8 \u4e2d\u6587"
    caps[8]["caption"] = "  padded caption  "
    caps[12]["image"] = "/abs/outside/root.png"
    csv_caps = caption_records(9, seed=12)
    csv_caps[2]["caption"] = 'with "quotes", commas\nand a newline'
    with open(root / "cap.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption"])
        w.writeheader()
        w.writerows(csv_caps)
    with open(root / "cap.csv", "a", newline="") as f:
        f.write("only-one-field\n")
    pq.write_table(
        pa.Table.from_pylist(caption_records(7, seed=13) + [{"image": "p.png", "caption": None}]), root / "cap.parquet"
    )
    caption = [
        _jsonl(root / "cap_a.jsonl", _dump(caps[:25]) + [b""] + AWKWARD_CAPTION_LINES + _dump_ascii_false(caps[25:40])),
        _jsonl(root / "cap_b.jsonl.gz", _dump(caps[40:]), gz=True),
        root / "cap.csv",
        root / "cap.parquet",
    ]
    (root / "cap_array.json").write_text(json.dumps(caption_records(5, seed=14)))
    caption.append(root / "cap_array.json")

    texts = text_records(40, seed=21)
    texts[5]["text"] = "  leading and trailing spaces are kept  "
    texts[6]["text"] = " ".join(WORDS) * 3  # a long document
    text_lines = _dump(texts[:20]) + [b'{"text": ""}', b'{"txt": "wrong field"}', b'{"text": "\\udfff"}']
    text = [_jsonl(root / "text_a.jsonl", text_lines), _jsonl(root / "text_b.jsonl", _dump(texts[20:]))]

    alpaca_recs = [
        {"instruction": "name a shape", "input": "", "output": "circle"},
        {"instruction": "color of", "input": "the sky", "output": "blue"},
        {"instruction": "no input field", "output": "fine"},
        {"instruction": "empty output", "input": "x", "output": " "},
        {"instruction": "input is null", "input": None, "output": "ok"},
    ]
    alpaca = [_jsonl(root / "alpaca.jsonl", _dump(alpaca_recs))]

    turns = [{"from": "human", "value": "<image>\nwhat shape"}, {"from": "gpt", "value": "a circle"}]
    llava_recs = [
        {
            "id": 1,
            "image": "img/1.png",
            "conversations": turns + [{"from": "human", "value": "color"}, {"from": "gpt", "value": "red"}],
        },
        {"image": "img/2.png", "conversations": [{"from": "human", "value": "what"}, {"from": "gpt", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "yes"}]},
        {
            "conversations": [
                {"from": "system", "value": "be brief"},
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "hello"},
            ]
        },
        {"image": "img/3.png", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
        {"image": "", "conversations": json.dumps(turns)},
    ]
    (root / "llava.json").write_text(json.dumps(llava_recs))
    llava = [root / "llava.json", _jsonl(root / "llava.jsonl", _dump(llava_recs[:3]))]
    return {"caption": caption, "text": text, "alpaca": alpaca, "llava": llava}


RUNS = {  # name: (kind, extra pretokenize arguments)
    "caption": ("caption", {"max_tokens": 64, "records_per_shard": 17}),
    "caption_checked": ("caption", {"records_per_shard": 1000, "check_images": True}),
    "text": ("text", {"records_per_shard": 9}),
    "alpaca": ("alpaca", {"records_per_shard": 2, "chat_template": "vicuna_v1"}),
    "llava": ("llava", {"records_per_shard": 4, "system_prompt": "you see images"}),
}


def manifest_digest(manifest: dict, root: Path) -> str:
    """sha256 of the manifest without what depends on the machine or the clock (paths become
    relative to ``root``; ``seconds``, ``command`` and the tokenizer's path are dropped)."""
    m = {k: v for k, v in manifest.items() if k not in ("seconds", "command")}
    m["tokenizer"] = {k: v for k, v in m["tokenizer"].items() if k != "path"}
    text = json.dumps(m, sort_keys=True).replace(str(root), "<root>")
    return hashlib.sha256(text.encode()).hexdigest()


def run_all(tmp: Path, tokenizer: Path, workers: int, names=tuple(RUNS)) -> dict[str, tuple[list[str], str]]:
    """name -> (shard sha256s, manifest digest) for the runs ``names`` of ``RUNS``."""
    inputs = build_inputs(tmp / "in")
    out: dict[str, tuple[list[str], str]] = {}
    for name in names:
        kind, extra = RUNS[name]
        m = pretokenize(
            [str(p) for p in inputs[kind]],
            fmt=kind,
            tokenizer=str(tokenizer),
            output=str(tmp / f"out_{name}_w{workers}"),
            workers=workers,
            on_error="skip",
            image_root=str(tmp / "in"),
            progress=False,
            command=["pinned"],
            **({"check_images": False} | extra),
        )
        shards = [
            hashlib.sha256((tmp / f"out_{name}_w{workers}" / s["file"]).read_bytes()).hexdigest() for s in m["shards"]
        ]
        assert shards == [s["sha256"] for s in m["shards"]]
        out[name] = (shards, manifest_digest(m, tmp))
    return out


GOLDEN: dict[str, tuple[list[str], str]] = {
    "caption": (
        [
            "5bcee7c4ce7fc8101e3cdc3d84005d357776b11701bf81c40abe6eae5fbfdaa7",
            "8610a97d347511eff14fc877c37dc32c1f7dff15ef8a4e0b5c9add52f0a2751b",
            "13616edcabfca966f0d76cea5612ae8674c28ddd10221a1c0a52346ce0b07da1",
            "2a5fa8765e8d8953ae0caad11536de5384d963d79542a7758578a78a1f89f7b6",
            "c6c73768420b13b6bf06f407fb0c3a11f9fe862252e527f7f04149ee6ca73f30",
            "8909635638475667218bd9facbf551758bd2f69f545516d2422f7527786b6658",
            "72a5b5853d9bc1a0df528f608e9f71ec843659d29018cdc83a095f3eca6139d4",
        ],
        "0d88cb53a0fa2269a325dee646e65cdb08f5efef3cac5d5e4281de00bbc7a3b1",
    ),
    "caption_checked": (
        [
            "71a543b759ba955f9c318f0d1f93af244c9f0e2b107b01deadd49eda9fc33c05",
        ],
        "67298994a329de08018861715ff4036253e016a7c02d337372496853953f963c",
    ),
    "text": (
        [
            "3d30d22b907b399fe767f5c40af1723b3026de0b144dc7d550b6142e6057f7e9",
            "95ef1e0983f8bfd47a21bfcff8c63ae80168073238567836b985cd90a4ec9637",
            "3b85497a04566badc26b153da4544515c04f8cbc84a43adeb6defa8e9ff93934",
            "d685becfe7c59be04ae4511212ea045fdddd8e4f23af5942ef37ea530d5f05a4",
            "d3142d1f28ff6e5f9c8d0c015d77dc443b345124d827b233ac32a756f58d6922",
        ],
        "ab2eadccc14a8e6edcc67419480f042dcc17422d6da40acacca6c16ce9215395",
    ),
    "alpaca": (
        [
            "4bd2d6ae34edf11437586a94d54114da0d632bf43fbff54442b241f942f71d2b",
            "5deaaa81356bb5aefe17f0d0c05fe595c05d46b612fa5cfd30779d83fcd90073",
            "d59dba0e3585e80e115113eb2d4705a902db8eeec35316de4550e865a51ead6b",
        ],
        "918172a0fe13f0746744a0ff4fb00ecd29fa9b2a457535d05ecdc7e9cd3df2cf",
    ),
    "llava": (
        [
            "3118870e98da4bf1278af3b5506cc46c64f4a4929b7229a0c5639a9b671075e8",
            "173843882713d3f77b32c89d4df62658bbef441ed13d9fed2677df45556a494d",
            "2c5908bce557bffe23d72004f346facdcac9fdced2f57b193884b3191d45c4fc",
        ],
        "5ab639de00fe30b15ea43a1a3d0c427057c8080ce4cce83ad3808b0b88c99669",
    ),
}


@pytest.fixture(scope="module")
def golden_tokenizer(tmp_path_factory) -> Path:
    path = train_sentencepiece(tmp_path_factory.mktemp("golden_tok") / "tokenizer.model")
    if hashlib.sha256(path.read_bytes()).hexdigest() != TOKENIZER_SHA256:
        pytest.fail(
            "the test tokenizer trains differently here (sentencepiece changed?): the golden hashes "
            "below were made with another model and must be regenerated from a trusted pretokenize"
        )
    return path


def test_output_bytes_are_pinned(tmp_path, golden_tokenizer):
    assert run_all(tmp_path, golden_tokenizer, 1) == GOLDEN


def test_output_bytes_are_pinned_with_workers(tmp_path, golden_tokenizer):
    # each run starts a worker pool (~1-2 s of imports per process): two runs, the fixed-template
    # kind (Arrow fast path and per-record fallback) and a chat kind, keep the test short
    names = ("caption", "llava")
    assert run_all(tmp_path, golden_tokenizer, 2, names) == {n: GOLDEN[n] for n in names}
