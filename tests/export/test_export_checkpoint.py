"""Real 2-rank training runs (deepspeed launcher, CPU) -> checkpoint -> consolidate / convert -> transformers.

The runs are the session's shared ones (tests/conftest.py): the stage-1 runs in zero3 and pipeline mode,
and the zero3 stage-2 run that continues from the first."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from mks2.checkpoint import MARKER, CheckpointError, find_checkpoint, load_consolidated, open_consolidated
from tests.launching import python

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zero3_stage1(stage1_zero3):
    return stage1_zero3["save_dir"]


@pytest.fixture(scope="module")
def pipeline_stage1(stage1_pipeline):
    return stage1_pipeline["save_dir"]


@pytest.fixture(scope="module")
def zero3_stage2(stage2_zero3):
    return stage2_zero3["save_dir"]


def test_zero3_consolidation_equals_deepspeeds_own_reader(zero3_stage1):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mks2.model.vision import VisionFrontEnd

    cfg, model = load_consolidated(zero3_stage1, progress=False)
    tag = find_checkpoint(zero3_stage1).tag
    reference = get_fp32_state_dict_from_zero_checkpoint(str(zero3_stage1), tag=tag)  # eager, all in memory
    ours = model.state_dict()
    in_engine = {k.removeprefix("model.") for k in reference}  # the objective wraps the model as .model
    towers = {n for n in ours if n.startswith("vision.") and not n.startswith("vision.mapping.")}
    # The frozen towers ran outside the ZeRO-3 engine (a replicated copy): none of them is in DeepSpeed's
    # files (a tower parameter inside the engine would be), all of them in rank 0's towers file.
    assert towers and not towers & in_engine and "vision.mapping.weight" in in_engine
    assert in_engine | towers == set(ours)
    for key, value in reference.items():
        assert torch.equal(ours[key.removeprefix("model.")], value), key
    vision_dir = VisionFrontEnd(cfg.model).state_dict()  # the towers as model.vision.path holds them (fp32 run)
    for name in towers:
        assert torch.equal(ours[name], vision_dir[name.removeprefix("vision.")]), name
    assert not model.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mvm." in n or n.startswith(("retrieval.", "vision.mapping.")) for n in trainable)


def test_pipeline_consolidation_maps_layer_files_by_index(pipeline_stage1):
    ckpt = find_checkpoint(pipeline_stage1)
    assert ckpt.mode.value == "pipeline"
    cfg, model = load_consolidated(pipeline_stage1, progress=False)
    ours = model.state_dict()
    seen = set()
    n = cfg.model.num_layers
    for index in range(n + 2):
        state = torch.load(ckpt.path / f"layer_{index:02d}-model_states.pt", weights_only=True)
        for key, value in state.items():
            if index == 0:
                name = "model." + key if key.startswith("embed_tokens.") else key
            elif index <= n:
                name = f"model.layers.{index - 1}." + key.removeprefix("layer.")
            else:
                name = "model." + key if key.startswith("norm.") else key
            assert torch.equal(ours[name], value), name
            seen.add(name)
    assert seen == set(ours)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["zero3", "pipeline"])
def test_cli_converts_and_transformers_reproduces_the_checkpoint(mode, zero3_stage1, pipeline_stage1, tmp_path):
    save_dir = zero3_stage1 if mode == "zero3" else pipeline_stage1
    out = tmp_path / "hf"
    run = python("tools/convert_to_hf.py", "--checkpoint", str(save_dir), "--output", str(out), "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "verification passed" in run.stdout
    manifest = json.loads((out / "mks2_export.json").read_text())
    assert manifest["provenance"]["parallel_mode"] == mode and manifest["verification"]["exact_max_abs_diff"] == 0
    cfg, model = load_consolidated(save_dir, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    p = model.vision.num_prefix_tokens
    ids = torch.randint(3, cfg.model.vocab_size, (2, p + 12), generator=torch.Generator().manual_seed(0))
    ids[0, 1 : 1 + p] = cfg.model.vision.image_token_id
    size = model.vision.info.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        hf(input_ids=ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits, atol=1e-5, rtol=0
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.bos_token_id == hf.generation_config.bos_token_id == 1


def test_stage2_checkpoint_merged_bf16_and_adapter_exports(zero3_stage2, tmp_path):
    from peft.utils import load_peft_weights

    merged = tmp_path / "merged"
    run = python("tools/convert_to_hf.py", "--checkpoint", str(zero3_stage2), "--output", str(merged),
                 "--merge-lora", "--dtype", "bf16", "--max-shard-size", "100KB", "--quiet")  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((merged / "mks2_export.json").read_text())
    assert manifest["merge_lora"] and manifest["weights"]["lora_merged_into"] == 2 * (3 + 3 + 1)
    assert manifest["verification"]["exact_max_abs_diff"] <= 1e-4
    assert len(list(merged.glob("model-*.safetensors"))) > 1

    adapter = tmp_path / "adapter"
    run = python("tools/convert_to_hf.py", "--checkpoint", str(zero3_stage2), "--output", str(adapter),
                 "--adapter-only", "--quiet")  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    weights = load_peft_weights(str(adapter))
    with open_consolidated(zero3_stage2) as ckpt:
        lora = [n for n in ckpt.meta if "lora_" in n]
        routers = [n for n in ckpt.meta if ".router." in n]
        assert len(weights) == len(lora) + len(routers) + 2  # + vision.mapping weight and bias
        for name in lora:
            module, part = name.rsplit(".", 1)
            assert torch.equal(weights[f"base_model.model.{module}.{part}.weight"], ckpt.get(name)), name


@torch.no_grad()
def test_stage2_routers_matter_beyond_the_verification_tolerance(zero3_stage2):
    """The shared stage-2 run's routers start at zero (the stage-2 tests check that they train). Its steps
    must move them far enough that an export which lost them (uniform gates) or swapped the experts
    (negated 2-way router) misses the verification's tolerance many times over; else the verification of
    the export above would prove nothing about the routers."""
    from mks2.export.verify import DEFAULT_ATOL, verification_batch

    cfg, model = load_consolidated(zero3_stage2, progress=False)
    batch = verification_batch(cfg)
    real = batch["attention_mask"].bool()  # [B, S]
    routed = model(**batch).logits[real]  # [T, V]
    with model.forced_gates([0.5, 0.5]):
        uniform = model(**batch).logits[real]
    routers = [p for n, p in model.named_parameters() if ".router." in n]
    for p in routers:
        p.neg_()  # softmax(-z) over two experts: the gates swapped
    swapped = model(**batch).logits[real]
    assert routers and (routed - uniform).abs().max() > 10 * DEFAULT_ATOL
    assert (routed - swapped).abs().max() > 10 * DEFAULT_ATOL


def test_incomplete_checkpoints_are_refused(zero3_stage1, tmp_path):
    tag = find_checkpoint(zero3_stage1).tag
    run_dir = tmp_path / "run"
    shutil.copytree(zero3_stage1 / tag, run_dir / tag)
    (run_dir / tag / MARKER).unlink()  # as if the save had been interrupted
    out = tmp_path / "hf"
    run = python("tools/convert_to_hf.py", "--checkpoint", str(run_dir), "--tag", tag, "--output", str(out))
    assert run.returncode == 1 and "not a complete checkpoint" in run.stderr and not out.exists()
    run = python("tools/convert_to_hf.py", "--checkpoint", str(run_dir), "--output", str(out))
    assert run.returncode == 1 and "holds no complete checkpoint" in run.stderr and not out.exists()
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        load_consolidated(run_dir / tag)
    # a newer incomplete save next to a complete one: the complete one is used
    shutil.copytree(zero3_stage1 / tag, run_dir / "step_00000001")
    assert find_checkpoint(run_dir).tag == "step_00000001"


def test_chat_on_a_training_checkpoint_answers_as_its_export(zero3_stage2, tmp_path):
    """tools/chat.py takes a training save_dir (ZeRO-3 shards consolidated on the fly) as well as an export:
    greedy, the two give the same streamed answer to the same question about an image (the image prefix,
    the vision tower and the chat template all come from the checkpoint in one case, the export in the other)."""
    export = tmp_path / "export"
    run = python("tools/convert_to_hf.py", "--checkpoint", str(zero3_stage2), "--output", str(export), "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    from PIL import Image

    Image.new("RGB", (48, 48), (30, 200, 30)).save(tmp_path / "green.png")
    answers = {}
    for name, model in (("checkpoint", zero3_stage2), ("export", export)):
        chat = python("tools/chat.py", str(model), "--prompt", "what colour is the ball?", "--temperature", "0",
                      "--max-new-tokens", "8", "--image", str(tmp_path / "green.png"))  # fmt: skip
        assert chat.returncode == 0 and "Traceback" not in chat.stderr, chat.stderr[-3000:]
        answers[name] = chat.stdout.strip()
    assert answers["checkpoint"] and answers["checkpoint"] == answers["export"]
