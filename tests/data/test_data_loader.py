"""build_dataloader end to end: stage-1 caption batches, stage-2 mixing + packing, resume, errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import CLIPImageProcessorPil

from mks2.config import VisionKind
from mks2.data.errors import DatasetError
from mks2.data.loader import build_dataloader
from mks2.data.pretokenize import pretokenize
from tests.data.data_helpers import caption_records, run_config, text_records, write_images, write_jsonl

P = 4  # vision prefix tokens


def _processor():
    return CLIPImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, sp_model):
    root = tmp_path_factory.mktemp("loader")
    write_images(root / "images", 40)
    common = dict(tokenizer=str(sp_model), progress=False, records_per_shard=16)
    pretokenize(
        [str(write_jsonl(root / "cap.jsonl", caption_records(40)))],
        fmt="caption",
        output=str(root / "cap"),
        image_root=str(root / "images"),
        **common,
    )
    pretokenize(
        [str(write_jsonl(root / "text.jsonl", text_records(60)))], fmt="text", output=str(root / "text"), **common
    )
    llava = [
        {
            "image": f"img/{i}.png",
            "conversations": [{"from": "human", "value": "what is it"}, {"from": "gpt", "value": rec["caption"]}],
        }
        for i, rec in enumerate(caption_records(30, seed=9))
    ]
    pretokenize(
        [str(write_jsonl(root / "llava.jsonl", llava))],
        fmt="llava",
        output=str(root / "llava"),
        image_root=str(root / "images"),
        **common,
    )
    return root


def _mvm_config(corpora, sp_model, **data):
    cfg = run_config([str(corpora / "cap")], tokenizer=str(sp_model), **data)
    cfg.model.vision.kind = VisionKind.CLIP
    cfg.model.vision.path = "unused-by-the-loader"
    return cfg


def test_stage1_caption_batches(corpora, sp_model):
    cfg = _mvm_config(corpora, sp_model, seq_len=32)
    loader = build_dataloader(cfg, rank=0, world_size=2, stage="mvm", image_processor=_processor(), num_prefix_tokens=P)
    batch = next(iter(loader))
    B, S = 4, 32
    assert batch["input_ids"].shape == batch["labels"].shape == (B, S)
    assert batch["pixel_values"].shape == (B, 3, 8, 8)
    assert ((batch["input_ids"] == -200).sum(dim=1) == P).all()
    assert batch["ret_input_ids"].shape == (B, S - P + 1)
    eos = batch["ret_input_ids"].gather(1, batch["ret_eos_index"][:, None])
    assert (eos == 2).all()
    # generation view = BOS, prefix, caption, EOS; the retrieval view is the same caption without the prefix
    for b in range(B):
        gen = batch["input_ids"][b][batch["segment_ids"][b] > 0]
        ret = batch["ret_input_ids"][b][batch["ret_segment_ids"][b] > 0]
        assert torch.equal(gen[gen != -200], ret)
    state = loader.state_dict()
    assert state["consumed_samples"] == B * 2 and state["world_size"] == 2


def test_stage2_mixing_packing_and_images(corpora, sp_model):
    cfg = run_config(
        [{"path": str(corpora / "text"), "weight": 1.0}, {"path": str(corpora / "llava"), "weight": 1.0}],
        tokenizer=str(sp_model),
        seq_len=96,
        packing=True,
    )
    loader = build_dataloader(
        cfg, rank=0, world_size=1, stage="mome", image_processor=_processor(), num_prefix_tokens=P
    )
    batches = list(itertools.islice(loader, 4))
    segs = torch.cat([b["segment_ids"] for b in batches])
    assert segs.max() > 2  # rows hold several documents
    n_img = sum(int((b["input_ids"] == -200).sum()) for b in batches)
    assert n_img == P * sum(b["pixel_values"].shape[0] for b in batches if "pixel_values" in b) > 0
    for b in batches:  # positions restart per document
        starts = (b["position_ids"] == 0) & (b["segment_ids"] > 0)
        assert starts.sum() == sum(int(r.max()) for r in b["segment_ids"])


def test_loader_resume_with_prefetching_workers(corpora, sp_model):
    cfg = run_config([str(corpora / "text")], tokenizer=str(sp_model), seq_len=48, packing=True, num_workers=1)
    full = build_dataloader(cfg, rank=0, world_size=1)
    batches = list(itertools.islice(full, 6))
    reference = [b["input_ids"] for b in batches]

    first = build_dataloader(cfg, rank=0, world_size=1)
    it = iter(first)
    for _ in range(2):
        next(it)  # workers prefetch further ahead; the state must not count that
    state = first.state_dict()
    resumed = build_dataloader(cfg, rank=0, world_size=1, state=state)
    rest = [b["input_ids"] for b in itertools.islice(resumed, 4)]
    assert all(torch.equal(a, b) for a, b in zip(reference[2:], rest))

    # consumed_rows alone (rows = steps x global batch) reaches the same point
    by_count = build_dataloader(cfg, rank=0, world_size=1, consumed_rows=state["consumed_rows"], num_workers=0)
    assert torch.equal(next(iter(by_count))["input_ids"], reference[2])
    # packed rows: the state counts the documents they held as samples (segment k of a row = its k-th document)
    documents = sum(int(row.max()) for b in batches[:2] for row in b["segment_ids"])
    assert state["consumed_rows"] == 2 * cfg.train.micro_batch_size
    assert state["consumed_samples"] == documents > state["consumed_rows"]


def test_dp_ranks_split_each_global_batch(corpora, sp_model):
    cfg = run_config([str(corpora / "text")], tokenizer=str(sp_model), seq_len=48)
    single = next(iter(build_dataloader(cfg, rank=0, world_size=1, batch_size=4)))
    halves = [next(iter(build_dataloader(cfg, rank=r, world_size=2, batch_size=2))) for r in range(2)]
    # round-robin dealing: rank r holds global rows r, r + 2
    assert torch.equal(single["input_ids"][0::2], halves[0]["input_ids"])
    assert torch.equal(single["input_ids"][1::2], halves[1]["input_ids"])


def test_eval_split_is_finite(corpora, sp_model):
    cfg = run_config([str(corpora / "text")], tokenizer=str(sp_model), eval_datasets=[str(corpora / "text")])
    loader = build_dataloader(cfg, rank=1, world_size=2, split="eval")
    assert len(loader) == len(list(loader)) == 8  # 60 samples -> 64 slots / 2 ranks / batch 4


def test_configuration_errors(corpora, sp_model, tmp_path):
    # data.packing in stage mvm: the packed (caption, retrieval) pair loader, never silently the padded one
    packed = build_dataloader(
        _mvm_config(corpora, sp_model, packing=True, seq_len=32),
        rank=0,
        world_size=1,
        stage="mvm",
        image_processor=_processor(),
        num_prefix_tokens=P,
    )
    from mks2.data.stage1_packing import PackedStepSampler

    assert isinstance(packed.sampler, PackedStepSampler)
    text_cfg = run_config([str(corpora / "text")], tokenizer=str(sp_model))
    with pytest.raises(DatasetError, match="stage mvm trains on caption datasets"):
        build_dataloader(text_cfg, rank=0, world_size=1, stage="mvm", image_processor=_processor(), num_prefix_tokens=P)
    with pytest.raises(DatasetError, match="holds images: pass the vision checkpoint's image_processor"):
        build_dataloader(run_config([str(corpora / "llava")], tokenizer=str(sp_model)), rank=0, world_size=1)
    from tests.data.data_helpers import train_sentencepiece

    other = train_sentencepiece(tmp_path / "o.model", seed=3, vocab_size=390)
    with pytest.raises(DatasetError, match="fingerprint"):
        build_dataloader(run_config([str(corpora / "text")], tokenizer=str(other)), rank=0, world_size=1)
    pretokenize(
        [str(corpora / "text.jsonl")], fmt="text", tokenizer=str(other), output=str(tmp_path / "other"), progress=False
    )
    with pytest.raises(DatasetError, match="tokenized with different tokenizers"):
        build_dataloader(
            run_config([str(corpora / "text"), str(tmp_path / "other")], tokenizer=None), rank=0, world_size=1
        )
    small_vocab = run_config([str(corpora / "text")], tokenizer=str(sp_model))
    small_vocab.model.vocab_size = 100
    with pytest.raises(DatasetError, match="model.vocab_size is 100"):
        build_dataloader(small_vocab, rank=0, world_size=1)


def test_chat_template_must_match(corpora, sp_model):
    cfg = run_config([str(corpora / "llava")], tokenizer=str(sp_model), chat_template="vicuna_v1")
    with pytest.raises(
        DatasetError, match="pretokenized with chat template llama2 but data.chat_template is vicuna_v1"
    ):
        build_dataloader(cfg, rank=0, world_size=1, image_processor=_processor(), num_prefix_tokens=P)
