"""Run-config schema: the section dataclasses, their enums and the rules each section must satisfy.

Plain stdlib only (no OmegaConf): the model code and the ``trust_remote_code`` files of an exported
model import this module alone; ``mks2.config.loader`` reads YAML and overrides into these classes.

Every leaf field carries an attribute docstring right under it (``tests/test_config.py`` fails on an
undocumented one; ``python -m mks2.config --reference`` turns them into ``docs/CONFIG.md``).

Each section is followed by the function that lists its problems. They are functions, not methods:
a loaded config is an OmegaConf ``DictConfig`` typed as ``RunConfig``, which reads fields like the
dataclass but does not carry its methods. ``validate`` collects every section's problems plus the
rules that span sections, so ``ConfigError`` can report them all in one message.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------------------------
# Enums for every mode switch (each member's docstring appears in docs/CONFIG.md)
# --------------------------------------------------------------------------------------------


class Stage(str, enum.Enum):
    BASE = "base"
    """Plain Llama."""
    MVM = "mvm"
    """Stage 1: visual information storage into the MVM experts."""
    MOME = "mome"
    """Stage 2: soft mixture of the MLP and MVM experts, each with LoRA."""


class MVMPlacement(str, enum.Enum):
    REPLACE = "replace"
    """``h + MVM(u)``, the MVM initialised as an exact copy of the MLP."""
    PARALLEL = "parallel"
    """``h + MLP(u) + MVM(u)``, the MVM down-projection zero-initialised."""


class VisionKind(str, enum.Enum):
    NONE = "none"
    """Text-only model: no vision front-end."""
    BLIP2 = "blip2"
    """Frozen BLIP-2 vision model + Q-Former + query tokens."""
    CLIP = "clip"
    """Frozen CLIP vision tower (its patch features form the prefix)."""


class AttentionBackend(str, enum.Enum):
    AUTO = "auto"
    """flash-attn on CUDA fp16/bf16 tensors when importable, else SDPA."""
    SDPA = "sdpa"
    """``torch.nn.functional.scaled_dot_product_attention``."""
    FLASH = "flash"
    """flash-attn (``pip install flash-attn``; CUDA fp16/bf16 only)."""
    EAGER = "eager"
    """Explicit ``softmax(QK^T)V``, for debugging."""


class KernelBackend(str, enum.Enum):
    AUTO = "auto"
    """CUDA tensors -> triton, CPU tensors -> the PyTorch reference."""
    TRITON = "triton"
    """The Triton kernel."""
    CUDA = "cuda"
    """The CUDA C++ extension (JIT-built on first use)."""
    TORCH = "torch"
    """The pure-PyTorch reference."""


class ParallelMode(str, enum.Enum):
    ZERO3 = "zero3"
    """Data parallel with ZeRO-3 partitioning (optional CPU/NVMe offload); no pipeline."""
    PIPELINE = "pipeline"
    """Pipeline parallel x data parallel with ZeRO-1."""


class FrozenBase(str, enum.Enum):
    PARTITION = "partition"
    """ZeRO-3 partitions the frozen base with everything else: least GPU memory, but every micro-batch
    all-gathers it three times (forward, recompute, backward)."""
    REPLICATE = "replicate"
    """The frozen base in the training dtype on every GPU, no per-micro-batch gathers; only the trainable
    state (gradients, fp32 master weights, Adam moments) is partitioned: DeepSpeed ZeRO-2."""


class Offload(str, enum.Enum):
    NONE = "none"
    """Everything stays on the accelerator."""
    CPU = "cpu"
    """Optimizer state and parameters offloaded to CPU memory."""
    NVME = "nvme"
    """Optimizer state and parameters offloaded to ``parallel.nvme_path``."""


class Precision(str, enum.Enum):
    FP32 = "fp32"
    """32-bit floats."""
    BF16 = "bf16"
    """bfloat16 (DeepSpeed keeps fp32 master weights)."""
    FP16 = "fp16"
    """float16 with DeepSpeed's dynamic loss scaling."""


class LongCaptions(str, enum.Enum):
    """What stage-1 packing does with a caption longer than a row (``data.long_captions``)."""

    TRUNCATE = "truncate"
    """Cut the caption to fit the row, its EOS kept; counted in the packed loader's state (``truncated``)."""
    REFUSE = "refuse"
    """Stop with the caption's file and row when its step is planned (the same step on every rank)."""


class ChatTemplate(str, enum.Enum):
    LLAMA2 = "llama2"
    """Llama-2-chat's ``[INST] ... [/INST]`` turns."""
    VICUNA_V1 = "vicuna_v1"
    """FastChat's ``vicuna_v1`` ``USER: ... ASSISTANT:`` turns (LLaVA's)."""


class SFTData(str, enum.Enum):
    ALL = "all"
    """Every dataset of ``data.datasets`` (MKS2)."""
    TEXT = "text"
    """Text-only instruction datasets only: the 'w/o multimodal SFT' ablation."""
    MULTIMODAL = "multimodal"
    """Datasets with images only: the 'w/o text SFT' ablation."""


# --------------------------------------------------------------------------------------------
# Model sections
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class MVMConfig:
    """The Modular Visual Memory experts (stages ``mvm`` and ``mome``)."""

    placement: MVMPlacement = MVMPlacement.REPLACE
    """Where the Modular Visual Memory sits beside the frozen FFN (DESIGN §1)."""
    layers: Any = "all"
    """Layers that carry an MVM: ``all``, ``every:K`` (layers 0, K, 2K, ...) or a list of indices."""
    intermediate_size: int | None = None
    """MVM FFN width; defaults to the MLP's. Must equal it for the ``replace`` placement."""


def mvm_layers_problem(layers: Any, num_layers: int) -> str | None:
    """Why ``model.mvm.layers`` is not a valid selection of ``num_layers`` layers (None: it is)."""
    if isinstance(layers, str):
        if layers == "all":
            return None
        if layers.startswith("every:"):
            try:
                step = int(layers.split(":", 1)[1])
            except ValueError:
                step = 0
            return None if step >= 1 else f"'every:K' needs a positive integer K, got {layers!r}"
        return f"expected 'all', 'every:K' or a list of layer indices, got {layers!r}"
    if isinstance(layers, Sequence):  # a list, tuple or OmegaConf ListConfig
        try:
            idx = [int(i) for i in layers]
        except (TypeError, ValueError):
            return f"expected 'all', 'every:K' or a list of layer indices, got {layers!r}"
        bad = [i for i in idx if not 0 <= i < num_layers]
        if bad:
            return f"layer indices {bad} outside 0..{num_layers - 1}"
        if len(set(idx)) != len(idx):
            return f"duplicate layer indices in {idx}"
        return None
    return f"expected 'all', 'every:K' or a list of layer indices, got {layers!r}"


def mvm_problems(m: ModelConfig) -> list[str]:
    """Problems of ``model.mvm`` within its model (layer count, MLP width and stage)."""
    p: list[str] = []
    if m.stage != Stage.BASE:
        problem = mvm_layers_problem(m.mvm.layers, m.num_layers)
        if problem:
            p.append(f"model.mvm.layers: {problem}")
    if (
        (m.stage == Stage.MVM or (m.stage == Stage.MOME and m.mome.use_mvm))
        and m.mvm.placement == MVMPlacement.REPLACE
        and m.mvm.intermediate_size is not None
        and m.mvm.intermediate_size != m.intermediate_size
    ):
        p.append(
            f"model.mvm.intermediate_size ({m.mvm.intermediate_size}) must equal model.intermediate_size "
            f"({m.intermediate_size}) for placement=replace (the MVM starts as an exact copy of the MLP); "
            "use placement=parallel for a different width"
        )
    if m.mvm.intermediate_size is not None and m.mvm.intermediate_size < 1:
        p.append(f"model.mvm.intermediate_size: must be positive, got {m.mvm.intermediate_size}")
    return p


LORA_TARGETS = ("mlp", "mvm", "q_proj", "k_proj", "v_proj", "o_proj")
"""Modules ``model.lora.targets`` may name."""


@dataclass(kw_only=True)
class LoRAConfig:
    """LoRA adapters of stage 2 (on the experts and optionally on the attention projections)."""

    rank: int = 16
    """LoRA rank r (stage 2)."""
    alpha: float = 32.0
    """LoRA scaling numerator: the update is (alpha / r) * B A x."""
    dropout: float = 0.05
    """Dropout on the LoRA input branch: the update is (alpha / r) * B A dropout(x), B zero-initialised."""
    targets: list[str] = field(default_factory=lambda: ["mlp", "mvm"])
    """Modules that get adapters: the experts ``mlp`` and ``mvm``, optionally ``q_proj``,
    ``k_proj``, ``v_proj``, ``o_proj``."""


def lora_problems(m: ModelConfig) -> list[str]:
    """Problems of ``model.lora`` (its targets must exist in the model's stage)."""
    p: list[str] = []
    bad_targets = [x for x in m.lora.targets if x not in LORA_TARGETS]
    if bad_targets:
        p.append(f"model.lora.targets: unknown {bad_targets} (allowed: {', '.join(sorted(LORA_TARGETS))})")
    if m.lora.rank < 1:
        p.append(f"model.lora.rank: must be positive, got {m.lora.rank}")
    if not 0.0 <= m.lora.dropout < 1.0:
        p.append(f"model.lora.dropout: must be in [0, 1), got {m.lora.dropout}")
    if m.stage == Stage.MOME and not m.mome.use_mvm and "mvm" in m.lora.targets and len(m.lora.targets) == 1:
        p.append("model.lora.targets: only 'mvm' is targeted but model.mome.use_mvm=false removes the MVM")
    return p


@dataclass(kw_only=True)
class MoMEConfig:
    """The stage-2 soft mixture of the MLP and MVM experts (per-token gates, computed in fp32)."""

    use_mvm: bool = True
    """False gives the 'w/o MoMEs' ablation: MLP + LoRA only, no MVM expert, no router."""
    router_init_std: float = 0.0
    """Std of the router weight at init; 0 gives uniform gates."""
    kernel_backend: KernelBackend = KernelBackend.AUTO
    """Backend of the fused token-mixing op (``mks2.ops.mome_mix``)."""


@dataclass(kw_only=True)
class VisionConfig:
    """The frozen vision front-end whose features, through a trainable linear layer, form the image prefix."""

    kind: VisionKind = VisionKind.NONE
    """Vision front-end type."""
    path: str | None = None
    """Local directory of a transformers BLIP-2 (``Blip2Model``/``Blip2ForConditionalGeneration``)
    or CLIP checkpoint. ``demo`` means the demo world's tiny vision tower (built on first use)."""
    image_token: str = "<image>"
    """Placeholder in text where the visual prefix is spliced."""
    image_token_id: int = -200
    """Token id of the placeholder in tokenized data, one per prefix token after collation (negative: never
    a real vocabulary id)."""
    image_size: int | None = None
    """Input resolution; defaults to the vision checkpoint's."""
    feature_layer: int = -2
    """CLIP only: hidden state whose patch tokens (CLS dropped) form the prefix, indexed like
    transformers' ``hidden_states`` (0 = embeddings, L = last layer): -2 = penultimate layer (LLaVA's
    choice), -1 = last layer. BLIP-2 always uses the Q-Former output."""


def vision_problems(m: ModelConfig) -> list[str]:
    """Problems of ``model.vision`` (the placeholder id must stay out of the model's vocabulary)."""
    p: list[str] = []
    if m.vision.kind != VisionKind.NONE and not m.vision.path:
        p.append(f"model.vision.path: required when model.vision.kind={m.vision.kind.value}")
    if m.vision.image_token_id >= 0 and m.vision.image_token_id < m.vocab_size:
        p.append(
            f"model.vision.image_token_id ({m.vision.image_token_id}) collides with a vocabulary id "
            f"(vocab_size={m.vocab_size}); use a negative id"
        )
    if m.stage == Stage.MVM and m.vision.kind == VisionKind.NONE:
        p.append("model.vision.kind: stage 'mvm' trains on images and needs a vision front-end (blip2 or clip)")
    return p


@dataclass(kw_only=True)
class ModelConfig:
    """The network: Llama architecture, training stage, attention kernel and the parts added by MKS2."""

    stage: Stage = Stage.BASE
    """Which model of DESIGN §1 to build: base, mvm (stage 1) or mome (stage 2)."""
    init_from: str | None = None
    """Local HF Llama directory to load; its config.json overrides the architecture fields below."""
    init_from_stage1: str | None = None
    """Stage-1 checkpoint directory to continue from (stage 2)."""
    vocab_size: int = 32000
    """Token embedding rows and LM-head outputs (HF ``vocab_size``)."""
    hidden_size: int = 4096
    """Residual stream width d (HF ``hidden_size``)."""
    intermediate_size: int = 11008
    """Inner width of the frozen SwiGLU MLP (HF ``intermediate_size``)."""
    num_layers: int = 32
    """Decoder layers (HF ``num_hidden_layers``)."""
    num_heads: int = 32
    """Attention query heads; ``hidden_size / num_heads`` is the head dimension and must be even (rotary)."""
    num_kv_heads: int | None = None
    """Grouped-query attention: key/value heads (defaults to num_heads)."""
    max_position_embeddings: int = 4096
    """Longest sequence the rotary embedding is trained for; ``data.seq_len`` may exceed it only with
    ``rope_scaling``."""
    rms_norm_eps: float = 1e-5
    """Epsilon of every RMSNorm (HF ``rms_norm_eps``)."""
    rope_theta: float = 10000.0
    """Rotary embedding base frequency (HF ``rope_theta``)."""
    rope_scaling: dict[str, Any] | None = None
    """HF ``rope_scaling`` dict: ``rope_type`` one of linear, dynamic, llama3, yarn (the legacy key ``type``
    is accepted)."""
    tie_word_embeddings: bool = False
    """Share the LM-head weight with the token embedding (Llama-2: false)."""
    attention: AttentionBackend = AttentionBackend.AUTO
    """Attention kernel."""
    dtype: Precision = Precision.FP32
    """Parameter dtype when the model is built outside DeepSpeed."""
    mvm: MVMConfig = field(default_factory=MVMConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    mome: MoMEConfig = field(default_factory=MoMEConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)


def model_problems(m: ModelConfig) -> list[str]:
    """Problems of the ``model`` section: the architecture, then its sub-sections."""
    p: list[str] = []
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
        if getattr(m, key) < 1:
            p.append(f"model.{key}: must be positive, got {getattr(m, key)}")
    if m.num_heads >= 1 and m.hidden_size % m.num_heads:
        p.append(f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads})")
    kv = m.num_kv_heads if m.num_kv_heads is not None else m.num_heads
    if kv < 1 or (m.num_heads >= 1 and m.num_heads % kv):
        p.append(f"model.num_kv_heads ({kv}) must be positive and divide model.num_heads ({m.num_heads})")
    if m.num_heads >= 1 and (m.hidden_size // m.num_heads) % 2:
        p.append(f"head dimension hidden_size/num_heads = {m.hidden_size // m.num_heads} must be even (rotary)")
    return p + mvm_problems(m) + lora_problems(m) + vision_problems(m)


# --------------------------------------------------------------------------------------------
# Data, training and parallelism sections
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class DatasetSource:
    """One entry of ``data.datasets`` / ``data.eval_datasets`` (a plain path string is accepted too)."""

    path: str = "???"
    """Pretokenized dataset directory (holds manifest.json) or a ``demo:NAME`` built on first use."""
    weight: float = 1.0
    """Relative sampling weight when several datasets are mixed."""


@dataclass(kw_only=True)
class DataConfig:
    """Training and evaluation data: pretokenized Arrow shards, tokenizer, packing and loading."""

    datasets: list[DatasetSource] = field(default_factory=list)
    """Training datasets with mixing weights, each a path or a ``{path, weight}`` mapping."""
    eval_datasets: list[DatasetSource] = field(default_factory=list)
    """Held-out datasets for evaluation: one ordered pass, padded so every rank runs as many batches."""
    tokenizer: str | None = None
    """sentencepiece model file or HF tokenizer directory (``demo`` for the demo world's); its fingerprint
    must match every dataset manifest's."""
    image_root: str | None = None
    """Directory the ``image`` column of the shards is relative to; overrides the ``--image-root`` recorded
    in each manifest at pretokenization."""
    cache_dir: str = "~/.cache/mks2"
    """Where demo data and other derived artefacts are built."""
    demo_world: str = "no_leak"
    """Which demo world ``demo:NAME`` placeholders resolve to: ``no_leak`` (only images link a held-out
    object's name to its looks) or ``paper`` (stage-1 captions describe appearance, as real captions do);
    see ``mks2/demo/README.md``. Ignored without demo placeholders."""
    seq_len: int = 2048
    """Tokens per sample after packing or padding (vision prefix included)."""
    packing: bool = True
    """Pack short samples into one sequence (attention isolated per document); else pad. Stage ``mvm``: each
    micro-batch is a token budget (``tokens_per_micro_batch``) of (caption view, retrieval view) pairs, each
    view its own segment; ``false`` pads every caption row and retrieval row to ``seq_len`` (the old layout)."""
    tokens_per_micro_batch: int = 0
    """Stage ``mvm`` with ``packing``: tokens per micro-batch, in rows of ``seq_len`` (a multiple of it);
    ``0``: ``seq_len x train.micro_batch_size``. ``train.micro_batch_size`` stays the average captions per
    micro-batch (a step holds ``global_batch_size`` captions); size the budget to about 1.1x their tokens
    (caption view P + caption + 2, retrieval view caption + 2) so few positions are padding."""
    long_captions: LongCaptions = LongCaptions.TRUNCATE
    """Stage ``mvm`` with ``packing``: a caption view longer than a row (``seq_len``) is ``truncate``d with its
    EOS kept (trained and counted), or ``refuse``d (the run stops naming its file and row)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (image decoding and processing run there)."""
    max_images_skipped: int = 100
    """Training: undecodable images (missing, truncated, not an image) tolerated over the whole run (resumes
    included), summed over all ranks. Each one's sample keeps its place in the batch with no loss (and no
    part in stage 1's retrieval loss), so batches and resume stay exact; ``metrics.jsonl`` counts them
    (``images_skipped`` per step, ``images_skipped_total``) and the log names the files. One more than this
    stops every rank together at the end of that step, naming the files and the step. ``0``: the first one
    stops the run; ``-1``: no limit."""
    verify_hashes: bool = True
    """Check shard sha256 against the manifest at start-up (slow on huge datasets)."""
    chat_template: ChatTemplate = ChatTemplate.LLAMA2
    """Prompt format of instruction data (stage 2); must be the one the datasets were pretokenized with."""


def data_problems(d: DataConfig) -> list[str]:
    """Problems of the ``data`` section."""
    p: list[str] = []
    if d.seq_len < 1:
        p.append(f"data.seq_len: must be positive, got {d.seq_len}")
    if d.num_workers < 0:
        p.append(f"data.num_workers: must be >= 0, got {d.num_workers}")
    if d.max_images_skipped < -1:
        p.append(f"data.max_images_skipped: must be >= -1 (-1: no limit), got {d.max_images_skipped}")
    if d.tokens_per_micro_batch < 0 or (d.seq_len >= 1 and d.tokens_per_micro_batch % d.seq_len):
        p.append(
            f"data.tokens_per_micro_batch={d.tokens_per_micro_batch}: must be 0 or a positive multiple of "
            f"data.seq_len={d.seq_len} (packed rows of seq_len tokens)"
        )
    if d.demo_world not in ("no_leak", "paper"):
        p.append(f"data.demo_world: must be no_leak or paper, got {d.demo_world!r}")
    for i, src in enumerate(d.datasets):
        if src.weight <= 0:
            p.append(f"data.datasets[{i}].weight: must be positive, got {src.weight}")
    return p


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation, schedule, losses, checkpointing and logging."""

    seed: int = 1234
    """Seed of the model initialisation (identical on every rank) and of the data order."""
    micro_batch_size: int = 1
    """Samples per rank per forward pass."""
    global_batch_size: int | None = 8
    """Samples per optimizer step over all data-parallel ranks (fixed global batch): micro x dp x accumulation,
    the accumulation derived from it, so it must be a multiple of micro x dp on every world size it runs on.
    ``null``: the global batch scales with the world size, micro x dp x ``grad_accumulation_steps`` (what the
    shipped Llama-2 configs do, so they run unchanged on 8 to 256 GPUs). When both are set they must agree."""
    grad_accumulation_steps: int | None = None
    """Micro-batches per rank per optimizer step; ``null``: derived from ``global_batch_size`` (1 when that is
    null too). Set it (and ``global_batch_size: null``) to fix the per-GPU work instead of the global batch:
    the global batch then grows with the data-parallel size, so scale ``lr`` and ``max_steps`` with it."""
    lr: float = 1e-4
    """Peak learning rate, reached after ``warmup_steps`` (AdamW)."""
    min_lr: float = 1e-5
    """Learning rate at ``max_steps``: cosine decay from ``lr`` after the warmup; in [0, lr]."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay of the trainable matrices (never of 1-d tensors such as norm scales)."""
    adam_beta1: float = 0.9
    """AdamW first-moment decay."""
    adam_beta2: float = 0.95
    """AdamW second-moment decay."""
    adam_eps: float = 1e-8
    """AdamW denominator epsilon."""
    warmup_steps: int = 100
    """Optimizer steps of linear learning-rate warmup from 0 to ``lr``."""
    max_steps: int = 1000
    """Optimizer steps of the run; the schedule ends and the last checkpoint is saved here."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    precision: Precision = Precision.BF16
    """Training precision of the DeepSpeed engine (its ``bf16``/``fp16`` sections are set from it)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass: less activation memory for one more forward pass of
    each layer."""
    caption_loss_weight: float = 1.0
    """Stage 1: weight of the image-to-text generation loss."""
    retrieval_loss_weight: float = 1.0
    """Stage 1: weight of the text-to-image contrastive loss."""
    sft_data: SFTData = SFTData.ALL
    """Stage 2: which of ``data.datasets`` to train on, by kind: ``all``, ``text`` (datasets without images;
    the 'w/o multimodal SFT' ablation) or ``multimodal`` (datasets with images; 'w/o text SFT')."""
    save_dir: str = "runs/default"
    """Run directory: checkpoints, ``metrics.jsonl`` and TensorBoard events (relative to the working directory)."""
    save_interval: int = 500
    """Optimizer steps between checkpoints; 0 saves only at the end."""
    keep_last: int = 3
    """Checkpoints kept; older complete ones are deleted."""
    resume: str = "auto"
    """``auto`` (newest complete checkpoint if any), ``none``, ``require`` (fail if none), or a tag
    (``step_00000010``) or step number."""
    max_skipped_steps: int = 10
    """Consecutive non-finite steps after which the run stops."""
    log_interval: int = 1
    """Optimizer steps between progress-bar updates (metrics.jsonl always gets every step)."""
    tensorboard: bool = False
    """Write TensorBoard events (DeepSpeed's monitor) under ``<save_dir>/tensorboard``."""
    csv: bool = False
    """Write every metric as CSV files (DeepSpeed's ``csv_monitor``) under ``<save_dir>/csv``."""
    wandb: bool = False
    """Log every metric to Weights & Biases (rank 0; files under ``<save_dir>/wandb``). ``WANDB_MODE=offline``
    (or ``wandb offline``) keeps the run on disk for a later ``wandb sync``; no network is needed then."""
    wandb_project: str = "mks2"
    """Weights & Biases project of the run."""
    wandb_run_name: str = ""
    """Weights & Biases run name; empty: the last component of ``train.save_dir``."""
    wandb_entity: str = ""
    """Weights & Biases entity (user or team); empty: your default entity."""
    eval_interval: int = 0
    """Optimizer steps between held-out evaluations on ``data.eval_datasets`` (stage 1: text-to-image
    retrieval top-1/top-5); 0 evaluates only at the end of training, -1 never."""


def train_problems(t: TrainConfig) -> list[str]:
    """Problems of the ``train`` section (the world-size-dependent batch check is ``mks2.training.batch``'s)."""
    p: list[str] = []
    if t.micro_batch_size < 1:
        p.append(f"train.micro_batch_size: must be positive, got {t.micro_batch_size}")
    if t.grad_accumulation_steps is not None and t.grad_accumulation_steps < 1:
        p.append(f"train.grad_accumulation_steps: must be positive or null, got {t.grad_accumulation_steps}")
    if t.global_batch_size is None:
        pass  # scales with the world size: micro x dp x grad_accumulation_steps (mks2.training.batch)
    elif t.global_batch_size < 1:
        p.append(f"train.global_batch_size: must be positive or null, got {t.global_batch_size}")
    elif t.micro_batch_size >= 1 and t.global_batch_size % t.micro_batch_size:
        p.append(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({t.micro_batch_size})"
        )
    if t.lr <= 0:
        p.append(f"train.lr: must be positive, got {t.lr}")
    if t.min_lr < 0 or t.min_lr > t.lr:
        p.append(f"train.min_lr ({t.min_lr}) must be in [0, train.lr={t.lr}]")
    if t.max_steps < 1:
        p.append(f"train.max_steps: must be positive, got {t.max_steps}")
    if t.warmup_steps < 0:
        p.append(f"train.warmup_steps: must be >= 0, got {t.warmup_steps}")
    if t.save_interval < 0:
        p.append(f"train.save_interval: must be >= 0, got {t.save_interval}")
    if t.keep_last < 1:
        p.append(f"train.keep_last: must be >= 1, got {t.keep_last}")
    if t.max_skipped_steps < 1:
        p.append(f"train.max_skipped_steps: must be >= 1, got {t.max_skipped_steps}")
    if t.grad_clip < 0:
        p.append(f"train.grad_clip: must be >= 0, got {t.grad_clip}")
    if t.eval_interval < -1:
        p.append(f"train.eval_interval: must be >= -1 (0: at the end only, -1: never), got {t.eval_interval}")
    if t.log_interval < 1:
        p.append(f"train.log_interval: must be >= 1, got {t.log_interval}")
    return p


@dataclass(kw_only=True)
class ParallelConfig:
    """Distributed execution with DeepSpeed (DESIGN §2)."""

    mode: ParallelMode = ParallelMode.ZERO3
    """Distributed execution (DESIGN §2): ``zero3`` (data parallel, ZeRO-3) or ``pipeline`` (stages x data
    parallel, ZeRO-1)."""
    pipeline_stages: int = 1
    """Pipeline stages P (pipeline mode); the world size must be divisible by P."""
    zero_stage: int | None = None
    """ZeRO stage; defaults to 3 for zero3 (2 with ``frozen_base=replicate``) and 1 for pipeline (which allows
    only 0 or 1)."""
    frozen_base: FrozenBase = FrozenBase.PARTITION
    """zero3 mode: ``partition`` (ZeRO-3) or ``replicate`` (ZeRO-2: every weight whole on every GPU in the
    training dtype, gradients and optimizer state partitioned); pipeline mode always replicates within a stage.
    Per GPU per micro-batch (``python tools/memory_table.py --traffic``, 8-256 GPUs) ``partition`` all-gathers
    every weight three times (forward, recompute, backward): 7B stage 1/2 ~66-75/59-67 GB, 13B ~128-146/114-129
    GB, 1.2-2.9 s at 50 GB/s of inter-node bandwidth against 0.8-1.4 s of compute; ``replicate`` moves only the
    trainable gradients each micro-batch and the updated trainable weights once a step: 7B/13B stage 1 ~11-13/
    19-21 GB, stage 2 ~0.1-0.2 GB. Its price is GPU memory (model state per GPU on 8 GPUs: 7B stage 1/2 ~35/25
    GB, 13B ~65/46 GB, vs 4-27 GB partitioned; docs/BENCHMARKS.md) and host memory at start-up (every rank
    builds the whole model). The shipped configs replicate, except 13B stage 1 (~65 GB before activations is
    too tight on 80 GB GPUs). The default stays ``partition``: it fits any GPU."""
    offload: Offload = Offload.NONE
    """ZeRO-3 optimizer/parameter offload."""
    nvme_path: str | None = None
    """Directory on a local NVMe drive for ``offload=nvme`` (optimizer state and parameters); required then."""
    ds_config: str | None = None
    """DeepSpeed JSON template; defaults to ds_configs/<mode>.json (zero3_offload.json with offload, zero2.json
    with ``frozen_base=replicate``)."""


def parallel_problems(par: ParallelConfig) -> list[str]:
    """Problems of the ``parallel`` section: DeepSpeed's limits, said in our words before it starts."""
    p: list[str] = []
    if par.pipeline_stages < 1:
        p.append(f"parallel.pipeline_stages: must be positive, got {par.pipeline_stages}")
    zero = par.zero_stage
    if zero is not None and zero not in (0, 1, 2, 3):
        p.append(f"parallel.zero_stage: must be 0, 1, 2 or 3, got {zero}")
    if par.mode == ParallelMode.PIPELINE:
        if zero is not None and zero >= 2:
            p.append(
                f"parallel.zero_stage={zero} cannot be used with parallel.mode=pipeline: DeepSpeed's pipeline "
                "engine supports only ZeRO stage 0 or 1 (use parallel.mode=zero3 for ZeRO-3)"
            )
        if par.offload != Offload.NONE:
            p.append("parallel.offload: offload needs ZeRO-3 and is not available with parallel.mode=pipeline")
    elif par.pipeline_stages != 1:
        p.append(
            f"parallel.pipeline_stages={par.pipeline_stages} needs parallel.mode=pipeline "
            "(zero3 mode is pure data parallel)"
        )
    if par.mode == ParallelMode.ZERO3 and par.frozen_base == FrozenBase.REPLICATE:
        if zero == 3:
            p.append(
                "parallel.frozen_base=replicate keeps the frozen base out of ZeRO-3 partitioning: it runs ZeRO-2; "
                "drop parallel.zero_stage=3 (or use frozen_base=partition)"
            )
        if par.offload != Offload.NONE:
            p.append(
                f"parallel.offload={par.offload.value} offloads partitioned parameters (ZeRO-3): it needs "
                "parallel.frozen_base=partition"
            )
    if par.offload == Offload.NVME and not par.nvme_path:
        p.append("parallel.nvme_path: required when parallel.offload=nvme")
    return p


# --------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class RunConfig:
    """A whole run: the four sections of a YAML run config."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def cross_section_problems(cfg: RunConfig) -> list[str]:
    """Rules that tie two sections together."""
    p: list[str] = []
    m, par, d = cfg.model, cfg.parallel, cfg.data
    if par.mode == ParallelMode.PIPELINE and par.pipeline_stages > m.num_layers:
        p.append(f"parallel.pipeline_stages ({par.pipeline_stages}) exceeds model.num_layers ({m.num_layers})")
    if d.seq_len > m.max_position_embeddings and not m.rope_scaling:
        p.append(f"data.seq_len ({d.seq_len}) exceeds model.max_position_embeddings ({m.max_position_embeddings})")
    return p


def validate(cfg: RunConfig) -> list[str]:
    """Every semantic problem of a type-correct config, section by section (empty list when valid)."""
    return (
        model_problems(cfg.model)
        + train_problems(cfg.train)
        + parallel_problems(cfg.parallel)
        + data_problems(cfg.data)
        + cross_section_problems(cfg)
    )
