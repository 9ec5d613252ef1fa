"""Bad input, command by command: a non-zero exit, one line that names the file or option and the problem, no
traceback, and nothing left behind (no output, temporary, run folder or lock).

Each case runs the real command in-process (typer's CliRunner) on small real files written once per module; the
output folder of a case starts empty and must still hold exactly what the case put there first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from conftest import make_geotiff, make_image, make_segmenter, synthetic_image
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()

CLASSES_YAML = """
classes:
  - {id: 0, name: dark, color: "#202020"}
  - {id: 1, name: mid, color: "#808080"}
  - {id: 2, name: bright, color: "#E0E0E0"}
ignore_index: 255
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Every input the cases name: models, scenes, data folders, broken files (written once)."""
    from cdkd.artifacts import StudentInfo, save_student
    from cdkd.data.stats import NormStats
    from cdkd.models.student import build_student
    from cdkd.train.checkpoint import rng_state, save_checkpoint

    root = tmp_path_factory.mktemp("world")
    w: dict[str, Path] = {"root": root}
    w["seg"] = make_segmenter(root / "models" / "segmenter.pt", tile=64, overlap=16)
    torch.manual_seed(0)
    norm = NormStats(mean=(120.0,) * 3, std=(60.0,) * 3, bands=(1, 2, 3), dtype="uint8")
    w["student"] = root / "models" / "student.pt"
    save_student(
        w["student"],
        build_student("vit_s", img_size=32, embed_dim=48, depth=4, num_heads=2),
        StudentInfo(
            "vit_s",
            {"img_size": 32, "in_chans": 3, "embed_dim": 48, "depth": 4, "num_heads": 2},
            norm,
            {"teacher": "none"},
        ),
    )
    w["ckpt"] = save_checkpoint(
        root / "run" / "checkpoints", 2, {"rng": rng_state(), "model": {}}, "cdkd.distill-checkpoint"
    )
    w["text"] = root / "models" / "notes.txt"
    w["text"].write_text("not a model\n")
    w["garbage_pt"] = root / "models" / "garbage.pt"
    w["garbage_pt"].write_bytes(b"PK\x03\x04 definitely not a zip")

    scenes = root / "scenes"
    w["scene"] = make_geotiff(scenes / "scene.tif", synthetic_image((3, 90, 100), seed=1))
    w["nocrs"] = make_geotiff(scenes / "nocrs.tif", synthetic_image((3, 40, 40), seed=2), crs=None)
    w["oneband"] = make_geotiff(scenes / "oneband.tif", synthetic_image((1, 40, 40), seed=3))
    w["u16"] = make_geotiff(scenes / "u16.tif", synthetic_image((3, 40, 40), seed=4, dtype="uint16"))
    w["empty"] = make_geotiff(scenes / "empty.tif", np.zeros((3, 50, 50), np.uint8), nodata=0)
    w["corrupt"] = scenes / "corrupt.tif"
    w["corrupt"].write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    w["folder_as_file"] = scenes / "afile"
    w["folder_as_file"].write_text("a file where a folder is expected\n")
    classes = np.zeros((1, 60, 60), np.uint8)
    classes[0, 20:, :] = 1
    w["classraster"] = make_geotiff(scenes / "classes.tif", classes)
    w["classes_nocrs"] = make_geotiff(scenes / "classes_nocrs.tif", classes, crs=None)

    # unlabeled data
    w["unl"] = root / "unl"
    for i in range(3):
        make_image(w["unl"] / f"t{i}.png", synthetic_image((3, 64, 64), seed=10 + i), "PNG")
    w["unl_empty"] = root / "unl_empty"
    w["unl_empty"].mkdir()
    w["unl_broken"] = root / "unl_broken"
    w["unl_broken"].mkdir()
    (w["unl_broken"] / "bad.tif").write_bytes(b"II*\x00 broken")

    # labeled data: a good folder set, and one broken way per case
    def labeled(name: str, mask_of: Callable[[int], np.ndarray], image_hw: tuple[int, int] = (48, 48)) -> Path:
        d = root / name
        for i in range(2):
            make_image(d / "images" / f"p{i}.png", synthetic_image((3, *image_hw), seed=20 + i), "PNG")
            make_image(d / "masks" / f"p{i}.png", mask_of(i), "PNG")
        (d / "classes.yaml").write_text(CLASSES_YAML)
        return d

    good = lambda i: np.random.default_rng(i).integers(0, 3, (1, 48, 48)).astype(np.uint8)  # noqa: E731

    def corner(i: int) -> np.ndarray:
        m = good(i)
        if i == 1:
            m[0, -6:, -6:] = 7  # a value outside the classes, in one corner of one mask
        return m

    w["lab"] = labeled("lab", good)
    w["lab_badvalue"] = labeled("lab_badvalue", corner)
    w["lab_size"] = labeled("lab_size", good, image_hw=(40, 48))
    w["classes"] = w["lab"] / "classes.yaml"
    w["classes_bad"] = root / "bad_classes.yaml"
    w["classes_bad"].write_text("classes: [unclosed\n")
    w["classes_other"] = root / "other_classes.yaml"
    w["classes_other"].write_text(
        "classes:\n  - {id: 0, name: a, color: '#000001'}\n  - {id: 1, name: b, color: '#000002'}\nignore_index: 255\n"
    )
    w["dubai_index"] = root / "dubai_index"
    for i in range(2):
        make_image(w["dubai_index"] / "tile1" / "images" / f"a{i}.jpg", synthetic_image((3, 48, 48), seed=i), "JPEG")
        make_image(w["dubai_index"] / "tile1" / "masks" / f"a{i}.png", good(i), "PNG")

    # COCO instances with a wrong declared size
    coco = root / "coco"
    make_image(coco / "images" / "a.png", synthetic_image((3, 64, 64), seed=5), "PNG")
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "instances.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "height": 80, "width": 64}],
                "annotations": [
                    {
                        "id": 1,
                        "image_id": 1,
                        "category_id": 1,
                        "bbox": [5, 5, 10, 10],
                        "iscrowd": 0,
                        "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]],
                        "area": 100,
                    }
                ],
                "categories": [{"id": 1, "name": "building"}],
            }
        )
    )
    w["coco"] = coco

    w["config_unknown"] = root / "unknown.yaml"
    w["config_unknown"].write_text("train:\n  nonsense: 1\n")
    w["config_yaml"] = root / "broken.yaml"
    w["config_yaml"].write_text("train: [1, 2\n")
    w["config_range"] = root / "range.yaml"
    w["config_range"].write_text("batch_size: 0\n")
    w["config_blend"] = root / "blend.yaml"
    w["config_blend"].write_text("blend_backend: cuda\n")
    return w


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]  # {name} = a path of ``world``; {out} = the case's own output folder
    needles: tuple[str, ...]  # what the error must say (the file or option, and the problem)
    code: int | None = None  # the exit code, when it matters (2: a bad value, 1: anything else)
    setup: Callable[[Path], None] | None = field(default=None, compare=False)  # puts things in {out} first


def _file(name: str, text: str = "x") -> Callable[[Path], None]:
    def make(out: Path) -> None:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)

    return make


SEG = ("segment", "{scene}", "--model", "{seg}", "--out", "{out}/lc.tif")
DIS = (
    "distill",
    "--data",
    "{unl}",
    "--teacher",
    "vit_t",
    "--random-teacher",
    "--tile-size",
    "32",
    "--workers",
    "0",
    "--out",
    "{out}/run",
)
FT = (
    "finetune",
    "--student",
    "{student}",
    "--data",
    "{lab}",
    "--format",
    "folder",
    "--classes",
    "{classes}",
    "--workers",
    "0",
    "--out",
    "{out}/run",
    "--tile-size",
    "32",
)
EV = ("evaluate", "{seg}", "--data", "{lab}", "--format", "folder", "--classes", "{classes}", "--out", "{out}/eval")
EX = ("export", "{seg}", "--out", "{out}/m.onnx")
VEC = ("vectorize", "{classraster}", "--out", "{out}/lc.gpkg")

CASES: dict[str, Case] = {
    # ------------------------------------------------------------------------------------------------ segment
    "seg-missing-model": Case(
        ("segment", "{scene}", "--model", "{root}/nope.pt", "--out", "{out}/lc.tif"), ("nope.pt", "not found"), 1
    ),
    "seg-checkpoint-as-model": Case(
        ("segment", "{scene}", "--model", "{ckpt}", "--out", "{out}/lc.tif"),
        ("step_0000002.pt", "training checkpoint"),
        1,
    ),
    "seg-student-as-model": Case(
        ("segment", "{scene}", "--model", "{student}", "--out", "{out}/lc.tif"), ("student.pt", "distilled student"), 1
    ),
    "seg-garbage-model": Case(
        ("segment", "{scene}", "--model", "{garbage_pt}", "--out", "{out}/lc.tif"), ("garbage.pt", "not a readable"), 1
    ),
    "seg-text-model": Case(
        ("segment", "{scene}", "--model", "{text}", "--out", "{out}/lc.tif"), ("notes.txt", "suffix"), 2
    ),
    "seg-no-model": Case(("segment", "{scene}", "--out", "{out}/lc.tif"), ("--model",), 2),
    "seg-both-models": Case((*SEG, "--engine", "{seg}"), ("--model", "--engine"), 2),
    "seg-no-out": Case(("segment", "{scene}", "--model", "{seg}"), ("--out",), 2),
    "seg-out-and-out-dir": Case((*SEG, "--out-dir", "{out}/d"), ("--out", "--out-dir"), 2),
    "seg-two-scenes-one-out": Case(
        ("segment", "{scene}", "{u16}", "--model", "{seg}", "--out", "{out}/lc.tif"), ("--out-dir",), 2
    ),
    "seg-missing-scene": Case(
        ("segment", "{root}/nope.tif", "--model", "{seg}", "--out", "{out}/lc.tif"), ("nope.tif",), 1
    ),
    "seg-corrupt-scene": Case(
        ("segment", "{corrupt}", "--model", "{seg}", "--out", "{out}/lc.tif"),
        ("corrupt.tif", "not a readable raster"),
        1,
    ),
    "seg-no-crs": Case(("segment", "{nocrs}", "--model", "{seg}", "--out", "{out}/lc.tif"), ("nocrs.tif", "no CRS"), 1),
    "seg-one-band": Case(
        ("segment", "{oneband}", "--model", "{seg}", "--out", "{out}/lc.tif"), ("oneband.tif", "--bands 1,1,1"), 1
    ),
    "seg-uint16-model-stats": Case(
        ("segment", "{u16}", "--model", "{seg}", "--out", "{out}/lc.tif"), ("u16.tif", "--stats scene"), 1
    ),
    "seg-all-nodata": Case(
        ("segment", "{empty}", "--model", "{seg}", "--out", "{out}/lc.tif"), ("empty.tif", "no valid pixel"), 1
    ),
    "seg-bands-count": Case((*SEG, "--bands", "1,2"), ("the model takes 3",), 1),
    "seg-band-zero": Case((*SEG, "--bands", "0,1,2"), ("--bands", ">= 1"), 2),
    "seg-band-beyond": Case((*SEG, "--bands", "1,2,9"), ("9",), 1),
    "seg-bands-text": Case((*SEG, "--bands", "a,b,c"), ("--bands", "integers"), 2),
    "seg-tile-not-multiple": Case((*SEG, "--tile-size", "50"), ("multiple of the patch",), 2),
    "seg-tile-zero": Case((*SEG, "--tile-size", "0"), ("--tile-size", ">= 16"), 2),
    "seg-tile-negative": Case((*SEG, "--tile-size", "-32"), ("--tile-size",), 2),
    "seg-tile-huge": Case((*SEG, "--tile-size", "1048576"), ("--tile-size", "<= 16384"), 2),
    "seg-tile-no-fit": Case((*SEG, "--tile-size", "16384", "--batch-size", "4096"), ("memory",), 2),
    "seg-overlap-negative": Case((*SEG, "--overlap", "-1"), ("--overlap", ">= 0"), 2),
    "seg-overlap-tile": Case((*SEG, "--overlap", "64"), ("overlap 64",), 2),
    "seg-batch-zero": Case((*SEG, "--batch-size", "0"), ("--batch-size", ">= 1"), 2),
    "seg-read-threads": Case((*SEG, "--read-threads", "-1"), ("--read-threads", ">= 0"), 2),
    "seg-min-score": Case((*SEG, "--min-score", "1.5"), ("--min-score", "<= 1"), 2),
    "seg-bad-runtime": Case((*SEG, "--runtime", "jax"), ("--runtime",), 2),
    "seg-bad-amp": Case((*SEG, "--amp", "fp8"), ("--amp",), 2),
    "seg-bad-stats": Case((*SEG, "--stats", "median"), ("--stats",), 2),
    "seg-bad-cuda-graph": Case((*SEG, "--cuda-graph", "maybe"), ("--cuda-graph",), 2),
    "seg-cuda-graph-on-cpu": Case((*SEG, "--cuda-graph", "on", "--device", "cpu"), ("--cuda-graph on", "CUDA"), 2),
    "seg-blend-backend": Case((*SEG, "--config", "{config_blend}"), ("blend backend", "triton"), 2),
    "seg-bad-on-error": Case((*SEG, "--on-error", "retry"), ("--on-error",), 2),
    "seg-out-png": Case(("segment", "{scene}", "--model", "{seg}", "--out", "{out}/lc.png"), ("lc.png", ".tif"), 2),
    "seg-out-gpkg-semantic": Case(
        ("segment", "{scene}", "--model", "{seg}", "--out", "{out}/lc.gpkg"), ("lc.gpkg", ".tif"), 2
    ),
    "seg-resume-nothing": Case((*SEG, "--resume"), ("nothing to resume",), 1),
    "seg-resume-and-overwrite": Case((*SEG, "--resume", "--overwrite"), ("--resume", "--overwrite"), 2),
    "seg-output-exists": Case(SEG, ("lc.tif", "--overwrite"), 1, _file("lc.tif")),
    "seg-partial-without-state": Case(SEG, ("lc.tif", "--overwrite"), 1, _file("lc.tif.partial/L0.tif")),
    "seg-partial-resume-no-state": Case(
        (*SEG, "--resume"), ("first checkpoint", "--overwrite"), 1, _file("lc.tif.partial/x")
    ),
    "seg-replaces-scene": Case(
        ("segment", "{scene}", "--model", "{seg}", "--out", "{scene}", "--overwrite"),
        ("scene.tif", "replace the scene"),
        2,
    ),
    "seg-out-under-a-file": Case(
        ("segment", "{scene}", "--model", "{seg}", "--out", "{folder_as_file}/lc.tif"), ("afile", "not a folder"), 1
    ),
    "seg-config-missing": Case((*SEG, "--config", "{root}/none.yaml"), ("none.yaml", "not found"), 2),
    "seg-config-broken": Case((*SEG, "--config", "{config_yaml}"), ("broken.yaml", "YAML"), 2),
    "seg-config-range": Case((*SEG, "--config", "{config_range}"), ("batch_size", ">= 1"), 2),
    "seg-engine-onnx-missing": Case(
        ("segment", "{scene}", "--engine", "{root}/m.onnx", "--out", "{out}/lc.tif"), ("m.onnx",), 1
    ),
    "seg-engine-no-sidecar": Case(
        ("segment", "{scene}", "--engine", "{text}", "--runtime", "tensorrt", "--out", "{out}/lc.tif"),
        ("notes.txt",),
        1,
    ),
    "seg-out-dir-is-file": Case(
        ("segment", "{scene}", "--model", "{seg}", "--out-dir", "{folder_as_file}"), ("afile",), 1
    ),
    "seg-preview-exists": Case((*SEG, "--preview"), ("lc.png", "--overwrite"), 1, _file("lc.png")),
    # ------------------------------------------------------------------------------------------------ distill
    "dis-no-data": Case(("distill", "--teacher", "vit_t", "--random-teacher", "--out", "{out}/run"), ("--data",), 2),
    "dis-data-missing": Case(
        (
            "distill",
            "--data",
            "{root}/nodata",
            "--teacher",
            "vit_t",
            "--random-teacher",
            "--tile-size",
            "32",
            "--out",
            "{out}/run",
        ),
        ("nodata", "not found"),
        1,
    ),
    "dis-data-is-file": Case(
        (
            "distill",
            "--data",
            "{text}",
            "--teacher",
            "vit_t",
            "--random-teacher",
            "--tile-size",
            "32",
            "--out",
            "{out}/run",
        ),
        ("notes.txt", "not a folder"),
        1,
    ),
    "dis-data-empty": Case(
        (
            "distill",
            "--data",
            "{unl_empty}",
            "--teacher",
            "vit_t",
            "--random-teacher",
            "--tile-size",
            "32",
            "--out",
            "{out}/run",
        ),
        ("unl_empty", "no usable image"),
        1,
    ),
    "dis-data-broken": Case(
        (
            "distill",
            "--data",
            "{unl_broken}",
            "--teacher",
            "vit_t",
            "--random-teacher",
            "--tile-size",
            "32",
            "--out",
            "{out}/run",
        ),
        ("unl_broken", "no usable image"),
        1,
    ),
    "dis-steps-zero": Case((*DIS, "--steps", "0"), ("--steps", ">= 1"), 2),
    "dis-steps-negative": Case((*DIS, "--steps", "-3"), ("--steps", ">= 1"), 2),
    "dis-epochs-zero": Case((*DIS, "--epochs", "0"), ("--epochs", "> 0"), 2),
    "dis-steps-and-epochs": Case((*DIS, "--steps", "2", "--epochs", "1"), ("--steps", "--epochs"), 2),
    "dis-lr-negative": Case((*DIS, "--lr", "-1"), ("--lr", "> 0"), 2),
    "dis-lr-zero": Case((*DIS, "--lr", "0"), ("--lr", "> 0"), 2),
    "dis-lr-nan": Case((*DIS, "--lr", "nan"), ("--lr", "finite"), 2),
    "dis-lr-huge": Case((*DIS, "--lr", "1e9"), ("--lr", "<= 10"), 2),
    "dis-batch-zero": Case((*DIS, "--batch-size", "0"), ("--batch-size", ">= 1"), 2),
    "dis-accum-zero": Case((*DIS, "--grad-accum", "0"), ("--grad-accum", ">= 1"), 2),
    "dis-in-chans-zero": Case((*DIS, "--in-chans", "0"), ("--in-chans", ">= 1"), 2),
    "dis-in-chans-huge": Case((*DIS, "--in-chans", "100000"), ("--in-chans", "<= 1024"), 2),
    "dis-in-chans-more-than-data": Case((*DIS, "--in-chans", "5"), ("unl", "no usable image"), 1),
    "dis-tile-not-multiple": Case(
        (*DIS[:-2], "--tile-size", "50", "--out", "{out}/run"), ("multiple of the patch",), 2
    ),
    "dis-tile-small": Case((*DIS[:-2], "--tile-size", "8", "--out", "{out}/run"), ("--tile-size", ">= 16"), 2),
    "dis-band-zero": Case((*DIS, "--bands", "0,1,2"), ("--bands", ">= 1"), 2),
    "dis-bands-vs-in-chans": Case((*DIS, "--bands", "1,2", "--in-chans", "3"), ("--bands", "--in-chans"), 2),
    "dis-bad-teacher": Case(
        ("distill", "--data", "{unl}", "--teacher", "vit_x", "--random-teacher", "--out", "{out}/run"), ("vit_x",), 2
    ),
    "dis-no-teacher-checkpoint": Case(
        ("distill", "--data", "{unl}", "--teacher", "vit_b", "--out", "{out}/run"),
        ("--teacher-checkpoint", "sam_vit_b"),
        None,
    ),
    "dis-teacher-checkpoint-missing": Case(
        (
            "distill",
            "--data",
            "{unl}",
            "--teacher",
            "vit_b",
            "--teacher-checkpoint",
            "{root}/sam.pth",
            "--out",
            "{out}/run",
        ),
        ("sam.pth",),
        None,
    ),
    "dis-teacher-checkpoint-text": Case(
        ("distill", "--data", "{unl}", "--teacher", "vit_b", "--teacher-checkpoint", "{text}", "--out", "{out}/run"),
        ("notes.txt",),
        1,
    ),
    "dis-random-and-checkpoint": Case(
        ("distill", "--data", "{unl}", "--random-teacher", "--teacher-checkpoint", "{text}", "--out", "{out}/run"),
        ("--random-teacher",),
        2,
    ),
    "dis-bad-recipe": Case((*DIS, "--recipe", "nope"), ("nope", "mask-cdkd"), 2),
    "dis-bad-student": Case((*DIS, "--student", "resnet"), ("resnet", "vit_s"), 2),
    "dis-mask-ratio": Case((*DIS, "--mask-ratio", "1.5"), ("--mask-ratio", "< 1"), 2),
    "dis-noise-ratio-mask-cdkd": Case((*DIS, "--noise-ratio", "0.2"), ("--noise-ratio", "rs4d"), 2),
    "dis-guided-ratio-rs4d": Case(
        (*DIS, "--recipe", "rs4d", "--guided-ratio", "0.2"), ("--guided-ratio", "hyperkd"), 2
    ),
    "dis-rs4d-ratios-sum": Case(
        (*DIS, "--recipe", "rs4d", "--noise-ratio", "0.7", "--mask-ratio", "0.5"), ("exceed 1",), 2
    ),
    "dis-weights-two": Case((*DIS, "--weights", "1,2"), ("--weights", "3"), 2),
    "dis-weights-negative": Case((*DIS, "--weights", "1,-2,1"), ("--weights", ">= 0"), 2),
    "dis-seed-negative": Case((*DIS, "--seed", "-1"), ("--seed", ">= 0"), 2),
    "dis-workers-negative": Case((*DIS, "--workers", "-1"), ("--workers", ">= 0"), 2),
    "dis-config-unknown-key": Case((*DIS, "--config", "{config_unknown}"), ("nonsense",), 2),
    "dis-resume-nothing": Case((*DIS, "--resume"), ("nothing to resume",), 1),
    "dis-out-exists": Case(DIS, ("run", "--overwrite"), 1, _file("run/config.yaml")),
    "dis-out-exists-resume-offer": Case(
        (*DIS, "--resume"), ("nothing to resume", "--overwrite"), 1, _file("run/config.yaml", "recipe: mask-cdkd\n")
    ),
    "dis-out-under-a-file": Case((*DIS[:-2], "--out", "{folder_as_file}/run"), ("afile", "not a folder"), 1),
    "dis-bad-wavelengths": Case((*DIS, "--wavelengths", "nonsense"), ("nonsense",), None),
    "dis-hyperkd-no-wavelengths": Case((*DIS, "--recipe", "hyperkd"), ("--wavelengths",), 2),
    # ------------------------------------------------------------------------------------------------ finetune
    "ft-student-missing": Case(
        (
            "finetune",
            "--student",
            "{root}/none.pt",
            "--data",
            "{lab}",
            "--format",
            "folder",
            "--classes",
            "{classes}",
            "--out",
            "{out}/run",
        ),
        ("none.pt", "not found"),
        1,
    ),
    "ft-student-is-segmenter": Case(
        (
            "finetune",
            "--student",
            "{seg}",
            "--data",
            "{lab}",
            "--format",
            "folder",
            "--classes",
            "{classes}",
            "--out",
            "{out}/run",
        ),
        ("segmenter", "student"),
        1,
    ),
    "ft-student-is-checkpoint": Case(
        (
            "finetune",
            "--student",
            "{ckpt}",
            "--data",
            "{lab}",
            "--format",
            "folder",
            "--classes",
            "{classes}",
            "--out",
            "{out}/run",
        ),
        ("training checkpoint",),
        1,
    ),
    "ft-data-missing": Case(
        (
            "finetune",
            "--student",
            "{student}",
            "--data",
            "{root}/nolab",
            "--format",
            "folder",
            "--classes",
            "{classes}",
            "--out",
            "{out}/run",
        ),
        ("nolab", "not found"),
        1,
    ),
    "ft-bad-format": Case((*FT, "--format", "tiff"), ("--format",), 2),
    "ft-folder-without-classes": Case(
        ("finetune", "--student", "{student}", "--data", "{lab}", "--format", "folder", "--out", "{out}/run"),
        ("class file",),
        2,
    ),
    "ft-classes-missing": Case((*FT, "--classes", "{root}/none.yaml"), ("none.yaml",), None),
    "ft-classes-broken": Case((*FT, "--classes", "{classes_bad}"), ("bad_classes.yaml",), None),
    "ft-dubai-index-masks": Case(
        (
            "finetune",
            "--student",
            "{student}",
            "--data",
            "{dubai_index}",
            "--format",
            "dubai",
            "--workers",
            "0",
            "--out",
            "{out}/run",
            "--tile-size",
            "32",
        ),
        ("single-band index mask", "--format folder"),
        1,
    ),
    "ft-mask-value-in-a-corner": Case(
        (
            "finetune",
            "--student",
            "{student}",
            "--data",
            "{lab_badvalue}",
            "--format",
            "folder",
            "--classes",
            "{classes}",
            "--workers",
            "0",
            "--out",
            "{out}/run",
            "--tile-size",
            "32",
        ),
        ("p1.png", "unknown value", "7"),
        1,
    ),
    "ft-size-mismatch": Case(
        (
            "finetune",
            "--student",
            "{student}",
            "--data",
            "{lab_size}",
            "--format",
            "folder",
            "--classes",
            "{classes}",
            "--workers",
            "0",
            "--out",
            "{out}/run",
            "--tile-size",
            "32",
        ),
        ("p0.png", "same size"),
        1,
    ),
    "ft-batch-one-bn": Case((*FT, "--batch-size", "1"), ("--batch-size 1", "BatchNorm"), 2),
    "ft-lr-negative": Case((*FT, "--lr", "-1"), ("--lr", "> 0"), 2),
    "ft-steps-zero": Case((*FT, "--steps", "0"), ("--steps", ">= 1"), 2),
    "ft-tile-not-multiple": Case((*FT, "--tile-size", "50"), ("multiple of the patch",), 2),
    "ft-decoder-channels": Case((*FT, "--decoder-channels", "0"), ("--decoder-channels", ">= 1"), 2),
    "ft-bad-head": Case((*FT, "--head", "mlp"), ("--head",), 2),
    "ft-bad-task": Case((*FT, "--task", "panoptic"), ("--task",), 2),
    "ft-instance-with-folder": Case((*FT, "--task", "instance"), ("folder", "instance"), 2),
    "ft-coco-declared-size": Case(
        (
            "finetune",
            "--task",
            "instance",
            "--student",
            "{student}",
            "--data",
            "{coco}",
            "--format",
            "coco",
            "--out",
            "{out}/run",
        ),
        ("declared 80x64", "64x64"),
        1,
    ),
    "ft-split-none": Case((*FT, "--split", "nothing*"), ("nothing*",), 1),
    "ft-out-exists": Case(FT, ("run", "--overwrite"), 1, _file("run/metrics.jsonl")),
    "ft-out-under-a-file": Case((*FT[:-4], "--out", "{folder_as_file}/run"), ("afile", "not a folder"), 1),
    # ------------------------------------------------------------------------------------------------ evaluate
    "ev-model-missing": Case(
        (
            "evaluate",
            "{root}/none.pt",
            "--data",
            "{lab}",
            "--format",
            "folder",
            "--classes",
            "{classes}",
            "--out",
            "{out}/eval",
        ),
        ("none.pt", "not found"),
        1,
    ),
    "ev-model-is-student": Case(
        (
            "evaluate",
            "{student}",
            "--data",
            "{lab}",
            "--format",
            "folder",
            "--classes",
            "{classes}",
            "--out",
            "{out}/eval",
        ),
        ("student.pt", "distilled student"),
        1,
    ),
    "ev-data-missing": Case(
        ("evaluate", "{seg}", "--data", "{root}/nolab", "--format", "dubai", "--out", "{out}/eval"), ("nolab",), 1
    ),
    "ev-bad-format": Case((*EV, "--format", "tiff"), ("--format",), 2),
    "ev-classes-mismatch": Case(
        (
            "evaluate",
            "{seg}",
            "--data",
            "{lab}",
            "--format",
            "folder",
            "--classes",
            "{classes_other}",
            "--out",
            "{out}/eval",
        ),
        ("other_classes.yaml",),
        None,
    ),
    "ev-out-exists": Case(EV, ("eval", "--overwrite"), 1, _file("eval/metrics.json")),
    "ev-overlap-tile": Case((*EV, "--overlap", "64"), ("overlap 64",), 2),
    "ev-bad-runtime": Case((*EV, "--runtime", "jax"), ("--runtime",), 2),
    "ev-dubai-index-masks": Case(
        ("evaluate", "{seg}", "--data", "{dubai_index}", "--format", "dubai", "--out", "{out}/eval"),
        ("single-band index mask",),
        1,
    ),
    "ev-out-under-a-file": Case((*EV[:-2], "--out", "{folder_as_file}/eval"), ("afile", "not a folder"), 1),
    # ------------------------------------------------------------------------------------------------ export
    "ex-model-missing": Case(("export", "{root}/none.pt", "--out", "{out}/m.onnx"), ("none.pt", "not found"), 1),
    "ex-model-is-student": Case(("export", "{student}", "--out", "{out}/m.onnx"), ("distilled student",), 1),
    "ex-model-is-checkpoint": Case(("export", "{ckpt}", "--out", "{out}/m.onnx"), ("training checkpoint",), 1),
    "ex-bad-format": Case((*EX, "--format", "tflite"), ("--format",), 2),
    "ex-out-exists": Case(EX, ("m.onnx", "--overwrite"), 1, _file("m.onnx")),
    "ex-out-under-a-file": Case(("export", "{seg}", "--out", "{folder_as_file}/m.onnx"), ("afile", "not a folder"), 1),
    # ------------------------------------------------------------------------------------------------ vectorize
    "vec-raster-missing": Case(("vectorize", "{root}/none.tif", "--out", "{out}/lc.gpkg"), ("none.tif",), 1),
    "vec-rgb-raster": Case(("vectorize", "{scene}", "--out", "{out}/lc.gpkg"), ("scene.tif",), 1),
    "vec-no-crs": Case(("vectorize", "{classes_nocrs}", "--out", "{out}/lc.gpkg"), ("classes_nocrs.tif", "CRS"), 1),
    "vec-min-area": Case((*VEC, "--min-area", "lots"), ("--min-area",), 2),
    "vec-simplify": Case((*VEC, "--simplify", "-1"), ("--simplify",), 2),
    "vec-area-mode": Case((*VEC, "--area", "spherical"), ("--area",), 2),
    "vec-out-extension": Case(("vectorize", "{classraster}", "--out", "{out}/lc.shp"), ("lc.shp",), 2),
    "vec-out-exists": Case(VEC, ("lc.gpkg", "--overwrite"), 1, _file("lc.gpkg")),
    "vec-layer-and-per-class": Case((*VEC, "--layer", "a", "--layer-per-class"), ("--layer",), 2),
    "vec-per-class-fgb": Case(
        ("vectorize", "{classraster}", "--out", "{out}/lc.fgb", "--layer-per-class"), ("lc.fgb", "one layer"), 2
    ),
    "vec-classes-missing": Case((*VEC, "--classes", "{root}/none.yaml"), ("none.yaml",), None),
    "vec-out-under-a-file": Case(
        ("vectorize", "{classraster}", "--out", "{folder_as_file}/lc.gpkg"), ("afile", "not a folder"), 1
    ),
    "vec-style-of-other-classes": Case(
        ("vectorize", "{classraster}", "--classes", "{classes}", "--out", "{out}/lc.fgb"),
        ("lc.qml", "another style"),
        1,
        _file("lc.qml", "<qgis/>"),
    ),
}


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clean_line(name: str, world: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CDKD_CACHE_DIR", str(tmp_path.parent / "cdkd-cache"))
    case = CASES[name]
    out = tmp_path / "out"
    out.mkdir()
    if case.setup is not None:
        case.setup(out)
    before_out, before_world = _listing(out), _listing(world["root"])
    args = [a.format(out=out, **world) for a in case.args]
    result = runner.invoke(app, args)
    text = result.output
    # an exception that escaped the command is a traceback on a real terminal (the runner catches it)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code != 0, text
    if case.code is not None:
        assert result.exit_code == case.code, text
    assert "Traceback" not in text, text
    errors = [ln for ln in text.splitlines() if ln.startswith("Error:")]
    usage = "Usage:" in text and result.exit_code == 2  # click's own refusal of an option (its usage box)
    assert len(errors) == 1 or (usage and not errors), text
    for needle in case.needles:
        assert needle.lower() in text.lower(), (needle, text)
    assert _listing(out) == before_out, "left behind in the output folder"
    assert _listing(world["root"]) == before_world, "changed the inputs"


def test_the_suite_is_large_enough() -> None:
    assert len(CASES) >= 100
