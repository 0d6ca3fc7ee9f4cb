"""Run configuration: OmegaConf structured configs, YAML files + ``key=value`` overrides, validation.

Every field is documented where it is declared. ``load_config`` merges a YAML file (or the embedded
demo default) with command-line overrides and validates the result; all problems found (unknown
keys, wrong types, bad enum values, impossible combinations) are reported together in one
``ConfigError`` so a user fixes a config in one round trip.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


class ConfigError(ValueError):
    """A run configuration is invalid. The message lists every problem found, one per line."""

    def __init__(self, problems: Sequence[str], source: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")


# --------------------------------------------------------------------------------------------
# Enums for every mode switch
# --------------------------------------------------------------------------------------------


class Stage(str, enum.Enum):
    BASE = "base"  # plain Llama
    MVM = "mvm"  # stage 1: visual information storage into MVM experts
    MOME = "mome"  # stage 2: soft mixture of MLP and MVM experts + LoRA


class MVMPlacement(str, enum.Enum):
    REPLACE = "replace"  # h + MVM(u), MVM initialised as an exact copy of the MLP
    PARALLEL = "parallel"  # h + MLP(u) + MVM(u), MVM down-projection zero-initialised


class VisionKind(str, enum.Enum):
    NONE = "none"  # text-only model: no vision front-end
    BLIP2 = "blip2"  # frozen BLIP-2 vision model + Q-Former + query tokens
    CLIP = "clip"  # frozen CLIP vision tower (patch features as the prefix)


class AttentionBackend(str, enum.Enum):
    AUTO = "auto"  # flash-attn on CUDA when importable, else SDPA
    SDPA = "sdpa"
    FLASH = "flash"
    EAGER = "eager"  # explicit softmax(QK^T)V, for debugging


class KernelBackend(str, enum.Enum):
    AUTO = "auto"  # CUDA tensors -> triton, CPU -> torch reference
    TRITON = "triton"
    CUDA = "cuda"
    TORCH = "torch"


class ParallelMode(str, enum.Enum):
    ZERO3 = "zero3"  # data parallel, ZeRO-3 partitioning
    PIPELINE = "pipeline"  # pipeline parallel x data parallel with ZeRO-1


class Offload(str, enum.Enum):
    NONE = "none"
    CPU = "cpu"
    NVME = "nvme"


class Precision(str, enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class ChatTemplate(str, enum.Enum):
    LLAMA2 = "llama2"
    VICUNA_V1 = "vicuna_v1"


class SFTData(str, enum.Enum):
    ALL = "all"  # every dataset of data.datasets (MKS2)
    TEXT = "text"  # text-only instruction datasets only: the 'w/o multimodal SFT' ablation
    MULTIMODAL = "multimodal"  # datasets with images only: the 'w/o text SFT' ablation


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class MVMConfig:
    placement: MVMPlacement = MVMPlacement.REPLACE
    """Where the Modular Visual Memory sits beside the frozen FFN (DESIGN §1)."""
    layers: Any = "all"
    """Layers that carry an MVM: ``all``, ``every:K`` (layers 0, K, 2K, ...) or a list of indices."""
    intermediate_size: int | None = None
    """MVM FFN width; defaults to the MLP's. Must equal it for the ``replace`` placement."""


@dataclass(kw_only=True)
class LoRAConfig:
    rank: int = 16
    """LoRA rank r (stage 2)."""
    alpha: float = 32.0
    """LoRA scaling numerator: the update is (alpha / r) * B A x."""
    dropout: float = 0.05
    """Dropout on the LoRA input branch."""
    targets: list[str] = field(default_factory=lambda: ["mlp", "mvm"])
    """Modules that get adapters: the experts ``mlp`` and ``mvm``, optionally ``q_proj``,
    ``k_proj``, ``v_proj``, ``o_proj``."""


@dataclass(kw_only=True)
class MoMEConfig:
    use_mvm: bool = True
    """False gives the 'w/o MoMEs' ablation: MLP + LoRA only, no MVM expert, no router."""
    router_init_std: float = 0.0
    """Std of the router weight at init; 0 gives uniform gates."""
    kernel_backend: KernelBackend = KernelBackend.AUTO
    """Backend of the fused token-mixing op (``mks2.ops.mome_mix``)."""


@dataclass(kw_only=True)
class VisionConfig:
    kind: VisionKind = VisionKind.NONE
    """Vision front-end type."""
    path: str | None = None
    """Local directory of a transformers BLIP-2 (``Blip2Model``/``Blip2ForConditionalGeneration``)
    or CLIP checkpoint. ``demo`` means the demo world's tiny vision tower (built on first use)."""
    image_token: str = "<image>"
    """Placeholder in text where the visual prefix is spliced."""
    image_token_id: int = -200
    """Token id of the placeholder in tokenized data (negative: never a real vocabulary id)."""
    image_size: int | None = None
    """Input resolution; defaults to the vision checkpoint's."""
    feature_layer: int = -2
    """CLIP only: hidden state whose patch tokens (CLS dropped) form the prefix, indexed like
    transformers' ``hidden_states`` (0 = embeddings, L = last layer): -2 = penultimate layer (LLaVA's
    choice), -1 = last layer. BLIP-2 always uses the Q-Former output."""


@dataclass(kw_only=True)
class ModelConfig:
    stage: Stage = Stage.BASE
    """Which model of DESIGN §1 to build: base, mvm (stage 1) or mome (stage 2)."""
    init_from: str | None = None
    """Local HF Llama directory to load; its config.json overrides the architecture fields below."""
    init_from_stage1: str | None = None
    """Stage-1 checkpoint directory to continue from (stage 2)."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None
    """Grouped-query attention: key/value heads (defaults to num_heads)."""
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """HF ``rope_scaling`` dict (``rope_type``: linear, dynamic, llama3, ...)."""
    tie_word_embeddings: bool = False
    attention: AttentionBackend = AttentionBackend.AUTO
    dtype: Precision = Precision.FP32
    """Parameter dtype when the model is built outside DeepSpeed."""
    mvm: MVMConfig = field(default_factory=MVMConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    mome: MoMEConfig = field(default_factory=MoMEConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)


@dataclass(kw_only=True)
class DatasetSource:
    path: str = "???"
    """Pretokenized dataset directory (holds manifest.json) or a ``demo:NAME`` built on first use."""
    weight: float = 1.0
    """Relative sampling weight when several datasets are mixed."""


@dataclass(kw_only=True)
class DataConfig:
    datasets: list[DatasetSource] = field(default_factory=list)
    """Training datasets with mixing weights."""
    eval_datasets: list[DatasetSource] = field(default_factory=list)
    """Held-out datasets for evaluation."""
    tokenizer: str | None = None
    """sentencepiece model file or HF tokenizer directory (``demo`` for the demo world's)."""
    image_root: str | None = None
    """Directory the ``image`` column of the shards is relative to."""
    cache_dir: str = "~/.cache/mks2"
    """Where demo data and other derived artefacts are built."""
    seq_len: int = 2048
    """Tokens per sample after packing or padding (vision prefix included)."""
    packing: bool = True
    """Pack short samples into one sequence (attention isolated per document); else pad."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    verify_hashes: bool = True
    """Check shard sha256 against the manifest at start-up (slow on huge datasets)."""
    chat_template: ChatTemplate = ChatTemplate.LLAMA2


@dataclass(kw_only=True)
class TrainConfig:
    seed: int = 1234
    micro_batch_size: int = 1
    """Samples per rank per forward pass."""
    global_batch_size: int = 8
    """Samples per optimizer step over all data-parallel ranks; must be micro x dp x accumulation."""
    lr: float = 1e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    warmup_steps: int = 100
    max_steps: int = 1000
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    precision: Precision = Precision.BF16
    activation_checkpointing: bool = False
    caption_loss_weight: float = 1.0
    """Stage 1: weight of the image-to-text generation loss."""
    retrieval_loss_weight: float = 1.0
    """Stage 1: weight of the text-to-image contrastive loss."""
    sft_data: SFTData = SFTData.ALL
    """Stage 2: which of ``data.datasets`` to train on, by kind: ``all``, ``text`` (datasets without images;
    the 'w/o multimodal SFT' ablation) or ``multimodal`` (datasets with images; 'w/o text SFT')."""
    save_dir: str = "runs/default"
    save_interval: int = 500
    """Optimizer steps between checkpoints; 0 saves only at the end."""
    keep_last: int = 3
    """Checkpoints kept; older complete ones are deleted."""
    resume: str = "auto"
    """``auto`` (newest complete checkpoint if any), ``none``, ``require`` (fail if none) or a tag."""
    max_skipped_steps: int = 10
    """Consecutive non-finite steps after which the run stops."""
    log_interval: int = 1
    """Optimizer steps between progress-bar updates (metrics.jsonl always gets every step)."""
    tensorboard: bool = False
    """Write TensorBoard events (DeepSpeed's monitor) under ``<save_dir>/tensorboard``."""
    eval_interval: int = 0
    """Optimizer steps between held-out evaluations on ``data.eval_datasets`` (stage 1: text-to-image
    retrieval top-1/top-5); 0 evaluates only at the end of training, -1 never."""


@dataclass(kw_only=True)
class ParallelConfig:
    mode: ParallelMode = ParallelMode.ZERO3
    pipeline_stages: int = 1
    """Pipeline stages P (pipeline mode); the world size must be divisible by P."""
    zero_stage: int | None = None
    """ZeRO stage; defaults to 3 for zero3 and 1 for pipeline (which allows only 0 or 1)."""
    offload: Offload = Offload.NONE
    """ZeRO-3 optimizer/parameter offload."""
    nvme_path: str | None = None
    ds_config: str | None = None
    """DeepSpeed JSON template; defaults to ds_configs/<mode>.json (zero3_offload.json with offload)."""


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


# --------------------------------------------------------------------------------------------
# Loading: every problem is collected, then reported at once
# --------------------------------------------------------------------------------------------


def _flatten(node: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """Yield (dotted key, leaf value) for a plain nested dict; lists and dict-valued free-form
    fields (rope_scaling) are leaves."""
    if isinstance(node, dict) and node and prefix not in _DICT_LEAVES:
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


_DICT_LEAVES = {"model.rope_scaling"}


def _schema_field(key: str) -> tuple[Any, list[str]] | None:
    """Return (annotation, sibling names) of a dotted key in RunConfig, or None if unknown."""
    cls: Any = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not is_dataclass(cls):
            return None
        hints = get_type_hints(cls)
        if part not in hints:
            return None
        ann = hints[part]
        if i == len(parts) - 1:
            return ann, list(hints)
        cls = ann
    return None


def _unknown_key_message(key: str) -> str:
    parts = key.split(".")
    cls: Any = RunConfig
    for i, part in enumerate(parts):
        names = [f.name for f in fields(cls)]
        if part not in names:
            where = ".".join(parts[:i]) or "top level"
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean '{'.'.join(parts[:i] + close)}'?" if close else ""
            return f"{key}: unknown key in {where} (allowed: {', '.join(names)}){hint}"
        cls = get_type_hints(cls)[part]
        if not is_dataclass(cls):
            return f"{key}: '{'.'.join(parts[: i + 1])}' is a value, not a section"
    return f"{key}: unknown key"


def _type_message(key: str, value: Any, ann: Any) -> str:
    enum_cls = next((a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, enum.Enum)), None)
    if enum_cls is not None:
        allowed = ", ".join(m.value for m in enum_cls)
        return f"{key}: invalid value {value!r} (allowed: {allowed})"
    name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
    return f"{key}: expected {name}, got {value!r} ({type(value).__name__})"


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"], source=str(path))
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml parse errors carry line numbers in their text
        raise ConfigError([f"cannot parse YAML: {exc}"], source=str(path)) from exc
    container = OmegaConf.to_container(loaded, resolve=False)
    if not isinstance(container, dict):
        raise ConfigError(["top level must be a mapping of sections"], source=str(path))
    return container


def _parse_overrides(overrides: Sequence[str], problems: list[str]) -> list[tuple[str, Any]]:
    parsed: list[tuple[str, Any]] = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override '{item}': expected key=value")
            continue
        try:
            dot = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
        except OmegaConfBaseException as exc:
            problems.append(f"override '{item}': {exc}")
            continue
        parsed.extend(_flatten(dot))
    return parsed


def _apply(cfg: DictConfig, key: str, value: Any, problems: list[str], origin: str) -> None:
    found = _schema_field(key)
    if found is None:
        problems.append(f"{_unknown_key_message(key)} [{origin}]")
        return
    ann, _ = found
    try:
        if key in ("data.datasets", "data.eval_datasets"):
            value = _dataset_list(key, value, problems, origin)
            if value is None:
                return
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException:
        problems.append(f"{_type_message(key, value, ann)} [{origin}]")


def _dataset_list(key: str, value: Any, problems: list[str], origin: str) -> list[dict] | None:
    """Normalise a dataset list (plain paths or {path, weight} mappings), reporting bad entries."""
    if not isinstance(value, (list, tuple)):
        problems.append(f"{key}: expected a list of dataset paths or {{path, weight}} mappings [{origin}]")
        return None
    allowed = [f.name for f in fields(DatasetSource)]
    out, ok = [], True
    for i, item in enumerate(value):
        item = {"path": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or "path" not in item:
            problems.append(f"{key}[{i}]: expected a path or a mapping with 'path' [{origin}]")
            ok = False
            continue
        for k in item:
            if k not in allowed:
                close = difflib.get_close_matches(str(k), allowed, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                problems.append(f"{key}[{i}].{k}: unknown key (allowed: {', '.join(allowed)}){hint} [{origin}]")
                ok = False
        out.append(item)
    return out if ok else None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Merge a YAML run config (``None``: the embedded demo default) with ``key=value`` overrides,
    validate, and return the typed config (an OmegaConf-backed ``RunConfig``)."""
    yaml_path = Path(path) if path is not None else DEMO_CONFIG
    problems: list[str] = []
    cfg = OmegaConf.structured(RunConfig)
    for key, value in _flatten(_read_yaml(yaml_path)):
        _apply(cfg, key, value, problems, origin=yaml_path.name)
    for key, value in _parse_overrides(overrides, problems):
        _apply(cfg, key, value, problems, origin="override")
    problems.extend(validate(cfg))  # fields that failed to apply keep defaults, so this is safe
    if problems:
        raise ConfigError(problems, source=f"{yaml_path}" + (" + overrides" if overrides else ""))
    return cfg  # type: ignore[return-value]


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a validated config from a plain dict (e.g. the resolved config saved in a checkpoint)."""
    problems: list[str] = []
    cfg = OmegaConf.structured(RunConfig)
    for key, value in _flatten(data):
        _apply(cfg, key, value, problems, origin="dict")
    problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems, source="saved config")
    return cfg  # type: ignore[return-value]


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain, YAML/JSON-serialisable dict of a config (enums as their string values)."""

    def plain(node: Any) -> Any:
        if isinstance(node, enum.Enum):
            return node.value
        if isinstance(node, dict):
            return {k: plain(v) for k, v in node.items()}
        if isinstance(node, list):
            return [plain(v) for v in node]
        return node

    return plain(OmegaConf.to_container(cfg, resolve=True))


# --------------------------------------------------------------------------------------------
# Semantic validation: impossible combinations
# --------------------------------------------------------------------------------------------


def mvm_layer_indices(layers: Any, num_layers: int) -> list[int]:
    """Resolve ``model.mvm.layers`` to sorted layer indices; raises ValueError with the reason."""
    if isinstance(layers, str):
        if layers == "all":
            return list(range(num_layers))
        if layers.startswith("every:"):
            try:
                k = int(layers.split(":", 1)[1])
            except ValueError:
                k = 0
            if k < 1:
                raise ValueError(f"'every:K' needs a positive integer K, got {layers!r}")
            return list(range(0, num_layers, k))
        raise ValueError(f"expected 'all', 'every:K' or a list of layer indices, got {layers!r}")
    if isinstance(layers, (list, tuple, ListConfig)):
        idx = [int(i) for i in layers]
        bad = [i for i in idx if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"layer indices {bad} outside 0..{num_layers - 1}")
        if len(set(idx)) != len(idx):
            raise ValueError(f"duplicate layer indices in {idx}")
        return sorted(idx)
    raise ValueError(f"expected 'all', 'every:K' or a list of layer indices, got {layers!r}")


def validate(cfg: RunConfig) -> list[str]:
    """Return every semantic problem of a type-correct config (empty list when valid)."""
    p: list[str] = []
    m, t, par, d = cfg.model, cfg.train, cfg.parallel, cfg.data

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

    if m.stage != Stage.BASE:
        try:
            mvm_layer_indices(m.mvm.layers, m.num_layers)
        except ValueError as exc:
            p.append(f"model.mvm.layers: {exc}")
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

    allowed_targets = {"mlp", "mvm", "q_proj", "k_proj", "v_proj", "o_proj"}
    bad_targets = [x for x in m.lora.targets if x not in allowed_targets]
    if bad_targets:
        p.append(f"model.lora.targets: unknown {bad_targets} (allowed: {', '.join(sorted(allowed_targets))})")
    if m.lora.rank < 1:
        p.append(f"model.lora.rank: must be positive, got {m.lora.rank}")
    if not 0.0 <= m.lora.dropout < 1.0:
        p.append(f"model.lora.dropout: must be in [0, 1), got {m.lora.dropout}")
    if m.stage == Stage.MOME and not m.mome.use_mvm and "mvm" in m.lora.targets and len(m.lora.targets) == 1:
        p.append("model.lora.targets: only 'mvm' is targeted but model.mome.use_mvm=false removes the MVM")

    if m.vision.kind != VisionKind.NONE and not m.vision.path:
        p.append(f"model.vision.path: required when model.vision.kind={m.vision.kind.value}")
    if m.vision.image_token_id >= 0 and m.vision.image_token_id < m.vocab_size:
        p.append(
            f"model.vision.image_token_id ({m.vision.image_token_id}) collides with a vocabulary id "
            f"(vocab_size={m.vocab_size}); use a negative id"
        )
    if m.stage == Stage.MVM and m.vision.kind == VisionKind.NONE:
        p.append("model.vision.kind: stage 'mvm' trains on images and needs a vision front-end (blip2 or clip)")

    if t.micro_batch_size < 1:
        p.append(f"train.micro_batch_size: must be positive, got {t.micro_batch_size}")
    if t.global_batch_size < 1:
        p.append(f"train.global_batch_size: must be positive, got {t.global_batch_size}")
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
        if par.pipeline_stages > m.num_layers:
            p.append(f"parallel.pipeline_stages ({par.pipeline_stages}) exceeds model.num_layers ({m.num_layers})")
    elif par.pipeline_stages != 1:
        p.append(
            f"parallel.pipeline_stages={par.pipeline_stages} needs parallel.mode=pipeline "
            "(zero3 mode is pure data parallel)"
        )
    if par.offload == Offload.NVME and not par.nvme_path:
        p.append("parallel.nvme_path: required when parallel.offload=nvme")

    if d.seq_len < 1:
        p.append(f"data.seq_len: must be positive, got {d.seq_len}")
    if d.seq_len > m.max_position_embeddings and not m.rope_scaling:
        p.append(f"data.seq_len ({d.seq_len}) exceeds model.max_position_embeddings ({m.max_position_embeddings})")
    if d.num_workers < 0:
        p.append(f"data.num_workers: must be >= 0, got {d.num_workers}")
    for i, src in enumerate(d.datasets):
        if src.weight <= 0:
            p.append(f"data.datasets[{i}].weight: must be positive, got {src.weight}")
    return p


def check_world_size(cfg: RunConfig, world_size: int) -> list[str]:
    """Problems with the batch arithmetic and pipeline split for a given number of ranks."""
    p: list[str] = []
    par, t = cfg.parallel, cfg.train
    stages = par.pipeline_stages if par.mode == ParallelMode.PIPELINE else 1
    if world_size % stages:
        p.append(f"world size {world_size} is not divisible by parallel.pipeline_stages ({stages})")
        return p
    dp = world_size // stages
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        p.append(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of micro_batch_size x "
            f"data-parallel size = {t.micro_batch_size} x {dp} = {per_step}"
        )
    return p


def grad_accumulation_steps(cfg: RunConfig, data_parallel_size: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * data_parallel_size)
