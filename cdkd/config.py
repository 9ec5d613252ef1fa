"""Configuration: frozen dataclasses for every stage, with YAML load/save and dotted overrides.

One place for defaults. The CLI loads ``--config FILE.yaml`` (if any) and applies the flags the user gave as
dotted overrides (``{"train.lr": 1e-4}``), so flags win over the file and the file wins over these defaults.
The resolved configuration is written next to every output.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, TypeVar, cast

import yaml

from cdkd.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

PATCH_SIZE = 16  # SAM and the ViT-S students all use 16 px patches


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take, and the command-line flag that sets it (for messages)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    flag: str | None = None

    def problem(self, value: float) -> str | None:
        """Why ``value`` is out of range, or None."""
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        for bound, ok, word in (
            (self.ge, lambda b: value >= b, ">="),
            (self.gt, lambda b: value > b, ">"),
            (self.le, lambda b: value <= b, "<="),
            (self.lt, lambda b: value < b, "<"),
        ):
            if bound is not None and not ok(bound):
                return f"must be {word} {bound:g}"
        return None


def bounded(default: Any, **limits: Any) -> Any:
    """A dataclass field with a ``Range`` (``ge``, ``gt``, ``le``, ``lt``, ``flag``), checked by ``check_ranges``."""
    return field(default=default, metadata={"range": Range(**limits)})


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Raise a ``ConfigError`` naming the key (and its flag) of the first setting outside its ``Range``; a tuple
    setting is checked item by item. Values of None (unset) pass."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{prefix}{f.name}.")
            continue
        limits = f.metadata.get("range")
        if limits is None or value is None:
            continue
        for v in value if isinstance(value, tuple) else (value,):
            problem = limits.problem(v)
            if problem is not None:
                flag = f" ({limits.flag})" if limits.flag else ""
                raise ConfigError(f"{prefix}{f.name}{flag} {problem}, got {v!r}")


@dataclass(frozen=True)
class DataConfig:
    """Unlabeled imagery for distillation."""

    root: str = ""  # folder searched recursively for JPEG, PNG, TIFF and GeoTIFF files
    tile_size: int = bounded(1024, ge=PATCH_SIZE, le=16384, flag="--tile-size")  # training crop (px), a multiple of 16
    bands: tuple[int, ...] | None = bounded(None, ge=1, flag="--bands")  # 1-based bands; None: the first `in_chans`
    stats_samples: int = bounded(64, ge=1)  # windows read once to compute the dataset-level normalisation statistics
    # what the bands measure: a sensor preset (sentinel2, sentinel2_l2a, naip, worldview3, enmap) or centres in nm,
    # each optionally centre:width ("443:20,490:65"); None = the files' band metadata (tags, ENVI header, names)
    wavelengths: str | None = None
    augment: bool = True  # random flips and 90-degree rotations
    num_workers: int = bounded(2, ge=0, flag="--workers")  # DataLoader worker processes


@dataclass(frozen=True)
class TeacherConfig:
    """Frozen SAM image encoder calibrated by multi-scale mixture-of-adapters (MMoA)."""

    variant: str = "vit_l"  # vit_b | vit_l | vit_h
    checkpoint: str | None = None  # official SAM checkpoint or an encoder-only state dict
    random_init: bool = False  # random SAM weights: tests and smoke runs only
    adapter: str = "multi"  # multi (fine + coarse atrous pyramids) | single (one plain bottleneck)
    fusion: str = "gate"  # gate (attention gate over FFN/fine/coarse) | add (plain sum)
    adapter_blocks: tuple[int, ...] | None = None  # 1-based blocks that get MMoA; None = every block
    adapter_dim: int = bounded(64, ge=1)  # bottleneck width of each adapter
    fine_dilations: tuple[int, ...] = bounded((1, 3, 5), ge=1)
    coarse_dilations: tuple[int, ...] = bounded((7, 9, 11), ge=1)
    gate_dim: int = bounded(64, ge=1)  # width of the gate's query/key projections
    grad_checkpointing: bool = False  # recompute teacher blocks in backward (saves memory on large tiles)
    # auto (fused `sdpa` on CUDA, segment-anything's own `sam` elsewhere) | sam | sdpa | flex: docs/gpu.md
    attention: str = "auto"


@dataclass(frozen=True)
class StudentConfig:
    """The small network that is distilled; see ``cdkd.models.student.STUDENT_REGISTRY``."""

    arch: str = "vit_s"  # vit_s | vit_s_win (windowed ViT) | rsmamba_s|b|l|h (RS4D's state-space students)
    in_chans: int | None = bounded(None, ge=1, le=1024, flag="--in-chans")  # None: 3, or every band (hyperkd)
    grad_checkpointing: bool = False  # recompute student blocks in backward (rsmamba's scan states at large tiles)


@dataclass(frozen=True)
class ObjectiveConfig:
    """Recipe ``mask-cdkd``: feature alignment (KD) + masked reconstruction for teacher and student.

    (The section keeps its historical name ``objective``; every other recipe has a section named after it.)
    """

    mask_ratio: float = bounded(0.75, ge=0, lt=1, flag="--mask-ratio")
    decoder_dim: int = bounded(256, ge=1)
    decoder_depth: int = bounded(4, ge=1)
    decoder_heads: int = bounded(8, ge=1)
    norm_pix_loss: bool = True  # per-patch normalised pixel targets (MAE), same scale as the KD term
    student_taps: tuple[int, ...] = (3, 6, 9)  # 1-based student blocks aligned to the teacher
    teacher_taps: tuple[int, ...] | None = None  # 1-based; None = the first global-attention blocks
    direction: str = "bi"  # bi: KD also trains the teacher adapters | uni: teacher features detached for KD
    schedule: str = "dynamic"  # dynamic (driven by r = L_T_MAE / L_S_MAE) | fixed
    fixed_weights: tuple[float, float, float] = bounded(
        (0.6, 0.2, 0.2), ge=0, flag="--weights"
    )  # (KD, T_MAE, S_MAE) for schedule=fixed
    ema_decay: float = bounded(0.98, ge=0, lt=1)  # smoothing of the losses that drive r
    schedule_warmup: int = bounded(20, ge=0)  # loss updates before the schedule may change stage


@dataclass(frozen=True)
class RS4DConfig:
    """Recipe ``rs4d``: L1 between the student's last features, projected to the teacher's 256 channels, and SAM's
    image embedding (its neck output, 1/16 resolution) of the clean tile; the student sees a corrupted tile.

    Of the valid (non-padding) patches of each tile, exactly round(noise_ratio * n) get Gaussian noise added and
    exactly round(mask_ratio * n) others are masked. The teacher is plain frozen SAM (no adapters).
    """

    noise_ratio: float = bounded(0.2, ge=0, le=1, flag="--noise-ratio")  # fraction of valid patches with added noise
    mask_ratio: float = bounded(
        0.2, ge=0, le=1, flag="--mask-ratio"
    )  # fraction of valid patches masked (mask token, or mean pixels for vit_s)
    noise_std: float = bounded(
        1.0, gt=0
    )  # noise standard deviation, in normalised units (1 = one dataset standard deviation)
    adaptive: bool = False  # raise both ratios toward the max_* values as the smoothed loss falls
    max_noise_ratio: float = bounded(0.4, ge=0, le=1)
    max_mask_ratio: float = bounded(0.4, ge=0, le=1)
    adapt_target: float = bounded(
        0.5, gt=0, lt=1
    )  # the ratios reach their maxima once the loss is this fraction of its reference
    adapt_warmup: int = bounded(50, ge=0)  # loss updates before the reference loss is taken
    ema_decay: float = bounded(0.98, ge=0, lt=1)  # smoothing of the loss that drives the ratios


@dataclass(frozen=True)
class HyperKDConfig:
    """Recipe ``hyperkd``: a student reading every band, taught by a frozen RGB SAM through spectral alignment.

    The teacher's R, G, B inputs are formed from the student's bands by their overlap with ``teacher_ranges``
    (``cdkd.data.alignment``); exactly round(mask_ratio * n) of each tile's valid patches are masked, chosen with a
    probability that mixes uniform sampling (1 - guided_ratio) with the teacher's per-patch feature saliency
    (guided_ratio); the student aligns its visible tokens to the teacher's features of the clean tile (KD) and
    reconstructs every band of the masked patches (pixel MSE + spectral angle).
    """

    mask_ratio: float = bounded(0.75, gt=0, lt=1, flag="--mask-ratio")
    guided_ratio: float = bounded(
        0.5, ge=0, le=1, flag="--guided-ratio"
    )  # 0 = uniform masking, 1 = masking probability proportional to teacher saliency
    teacher_ranges: tuple[float, ...] = (630.0, 690.0, 510.0, 580.0, 450.0, 510.0)  # (lo, hi) nm of R, G, B
    init_patch_embed: bool = True  # student's patch embedding from the teacher's through the alignment
    weights: tuple[float, float, float] = bounded((1.0, 1.0, 1.0), ge=0)  # KD, pixel reconstruction, spectral term
    spectral_loss: str = "angle"  # angle (spectral angle of the masked pixels' spectra) | none
    norm_pix_loss: bool = True  # per-patch normalised pixel targets (MAE)
    decoder_dim: int = 256
    decoder_depth: int = 4
    decoder_heads: int = 8
    student_taps: tuple[int, ...] = (3, 6, 9)  # 1-based student blocks aligned to the teacher
    teacher_taps: tuple[int, ...] | None = None  # 1-based; None = the first global-attention blocks


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping."""

    steps: int | None = bounded(
        None, ge=1, flag="--steps"
    )  # optimiser steps; exclusive with epochs; None with epochs None = 1000
    epochs: float | None = bounded(None, gt=0, flag="--epochs")  # passes over the image files
    batch_size: int = bounded(4, ge=1, flag="--batch-size")  # images per device per micro-batch
    grad_accum: int = bounded(1, ge=1, flag="--grad-accum")  # micro-batches per optimiser step
    lr: float = bounded(1e-5, gt=0, le=10, flag="--lr")
    weight_decay: float = bounded(0.01, ge=0)
    warmup_steps: int = bounded(100, ge=0)
    lr_schedule: str = "cosine"  # cosine | poly (after the linear warm-up)
    clip_grad: float = bounded(1.0, ge=0)
    amp: str = "auto"  # auto (bf16 on CUDA, none on CPU) | bf16 | fp16 | none
    seed: int = bounded(0, ge=0, lt=2**32, flag="--seed")
    checkpoint_every: int = bounded(500, ge=1, flag="--checkpoint-every")
    log_every: int = bounded(10, ge=1, flag="--log-every")
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    tensorboard: bool = False  # also write TensorBoard event files to RUN/tensorboard/ (needs tensorboard)
    # distillation on a GPU (docs/gpu.md): torch.compile of the teacher's and student's blocks, auto = on CUDA only
    compile: str = "auto"  # auto | on | off
    channels_last: bool = True  # the MMoA adapters' convolutions in channels-last memory (CUDA only)


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run. ``recipe`` names the method (``cdkd.distill.recipes.RECIPES``); its settings live in
    its own section (``objective`` for mask-cdkd, ``rs4d`` for rs4d, ``hyperkd`` for hyperkd); the other sections
    are shared."""

    recipe: str = "mask-cdkd"  # mask-cdkd | rs4d | hyperkd
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    rs4d: RS4DConfig = field(default_factory=RS4DConfig)
    hyperkd: HyperKDConfig = field(default_factory=HyperKDConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class LabeledDataConfig:
    """Labeled land-cover pairs for fine-tuning and evaluation."""

    root: str = ""
    format: str = "folder"  # dubai | deepglobe | loveda | isprs | openearthmap | folder; instances: coco | geo
    classes: str | None = None  # class file (YAML); required for format "folder"
    labels: str | None = None  # format geo: vector footprints (GeoJSON, GeoPackage, ...) of the scene in root
    class_field: str | None = None  # format geo: the footprints' attribute naming their class (None: one class)
    split: tuple[str, ...] | None = None  # fnmatch patterns on path components, e.g. ["tile[1-6]"] or ["train"]
    tile_size: int | None = bounded(None, ge=PATCH_SIZE, le=16384, flag="--tile-size")  # None: the student's
    overlap: int | None = bounded(None, ge=0, flag="--overlap")  # sliding-window overlap; None: a quarter tile
    augment: bool = True
    num_workers: int = bounded(2, ge=0, flag="--workers")


@dataclass(frozen=True)
class HeadConfig:
    """The decoder trained on the frozen student."""

    type: str = "upernet"  # upernet | linear (linear-probe baseline)
    layers: tuple[int, ...] = bounded((3, 6, 9, 12), ge=1)  # 1-based student blocks that feed the decoder
    channels: int = bounded(512, ge=1, le=8192, flag="--decoder-channels")
    norm: str = "bn"  # bn | gn
    unfreeze: bool = False  # train the student too (full fine-tuning)
    class_balanced: bool = False  # cross-entropy weighted by inverse sqrt class frequency


@dataclass(frozen=True)
class InstanceHeadConfig:
    """Task ``instance``: a simple feature pyramid (ViTDet) on the student feeding torchvision's Mask R-CNN.

    The student is frozen unless ``head.unfreeze``."""

    layer: int | None = None  # 1-based student block feeding the pyramid; None = the last
    channels: int = bounded(256, ge=1, le=8192)  # pyramid width
    anchor_sizes: tuple[int, ...] = bounded((16, 32, 64, 128, 256), ge=1)  # anchor side in px per level (strides 4..64)
    box_batch_size_per_image: int = bounded(512, ge=1)  # RoIs sampled per tile for the box head's loss
    detections_per_image: int = bounded(100, ge=1)  # most detections kept per tile
    object_bias: float = bounded(
        0.75, ge=0, le=1
    )  # share of training windows placed around an object (the rest uniform)


def _finetune_train() -> TrainConfig:
    # The paper's decoder protocol: AdamW lr 1e-4, 30 epochs, polynomial decay.
    return TrainConfig(lr=1e-4, batch_size=8, warmup_steps=0, lr_schedule="poly", checkpoint_every=200)


@dataclass(frozen=True)
class FinetuneConfig:
    student: str = ""  # path to student.pt
    task: str = "semantic"  # semantic (segmenter.pt: class rasters) | instance (detector.pt: objects)
    data: LabeledDataConfig = field(default_factory=LabeledDataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    instance: InstanceHeadConfig = field(default_factory=InstanceHeadConfig)
    train: TrainConfig = field(default_factory=_finetune_train)


# --------------------------------------------------------------------------------------------------------------
# dict / YAML conversion


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "config", base: T | None = None) -> T:
    """Build dataclass ``cls`` from a nested mapping; unknown keys and wrong types are a ``ConfigError``.

    Keys not in ``data`` keep their value in ``base`` (default: ``cls()``). Nested sections merge onto the
    parent's default for that section, so ``train: {log_every: 1}`` in a fine-tuning file keeps fine-tuning's
    own training defaults rather than falling back to the ``TrainConfig`` class defaults.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} in {cls.__name__}; known: {sorted(names)}")
    base = cls() if base is None else base
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = from_dict(
                cast("type[DataclassInstance]", tp), v or {}, source=f"{source}: {k}", base=getattr(base, k)
            )
        else:
            kwargs[k] = _coerce(tp, v, f"{source}: {k}")
    return dataclasses.replace(base, **kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(cast("type[DataclassInstance]", tp), value or {}, source=where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        last: Exception | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                last = e
        raise last or ConfigError(f"{where}: invalid value {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        item = args[0] if args else Any
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(item, v, where) for v in value)
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value)) if args else tuple(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare on/off (train.compile: off) as a boolean
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return str(value)
    return value


def load_config(cls: type[T], path: str | Path) -> T:
    """Read a YAML file into dataclass ``cls``; a missing or malformed file is a ``ConfigError``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return from_dict(cls, data, source=str(path))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML (atomically: a reader never sees half a file)."""
    from cdkd.utils.atomic import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def apply_overrides(cfg: T, overrides: Mapping[str, Any]) -> T:
    """Return ``cfg`` with dotted-key overrides applied: ``{"train.lr": 1e-4, "data.root": "tiles/"}``."""
    data = to_dict(cfg)
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"override {key}: no section {p!r}")
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"override {key}: unknown key {leaf!r}")
        node[leaf] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return from_dict(type(cfg), data, source="overrides")


PATH_KEYS = ("data.root", "data.classes", "data.labels", "teacher.checkpoint", "student")  # file/folder settings


def absolute_paths(cfg: T) -> T:
    """``cfg`` with its file and folder settings (``PATH_KEYS`` it has) made absolute, so that ``config.yaml``
    and checkpoints name the same files whatever folder a ``--resume`` is started from. URLs and GDAL virtual
    paths stay as they are."""
    data = to_dict(cfg)
    overrides: dict[str, Any] = {}
    for key in PATH_KEYS:
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, str) and node and "://" not in node and not node.startswith("/vsi"):
            overrides[key] = str(Path(node).expanduser().absolute())
    return apply_overrides(cfg, overrides) if overrides else cfg
