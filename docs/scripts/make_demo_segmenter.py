"""A small, barely trained segmenter for the QGIS picture (``render_qgis.py``), made on a CPU in half an hour.

    python docs/scripts/make_demo_segmenter.py OUT_DIR [--steps 250] [--data DUBAI_DIR]

(``--data`` defaults to ``$CDKD_SHARED_DATA/labeled/dubai``, else ``../shared/data/labeled/dubai``.)

Not a cdkd recipe: no SAM teacher and no distillation. A small ViT (embed 96, depth 6, 3 heads; 0.75 M
parameters, 1.37 M with the decoder) starts from random weights and is fine-tuned end to end (``--unfreeze``)
with a narrow UPerNet (64 channels) on the real Dubai tiles 1-6 (128 px crops); ``--eval-split 'tile[7-8]'``
scores held-out tiles. It gives a map that follows the scene's structure, nothing more: the picture shows the
provider and QGIS's rendering, not cdkd's accuracy.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from cdkd.artifacts import StudentInfo, save_student
from cdkd.config import FinetuneConfig, apply_overrides
from cdkd.data import compute_stats
from cdkd.data.files import find_rasters
from cdkd.evaluation.semantic import evaluate
from cdkd.finetune.trainer import finetune
from cdkd.models.student import build_student

ARCH_ARGS = {"embed_dim": 96, "depth": 6, "num_heads": 3, "img_size": 128, "in_chans": 3}
SHARED = Path(os.environ.get("CDKD_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
DEFAULT_DATA = SHARED / "labeled" / "dubai"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--eval-split", default=None, help="also score the held-out tiles, e.g. 'tile[7-8]' (slow "
                        "on a CPU: minutes per image)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    norm = compute_stats(find_rasters(args.data), bands=(1, 2, 3), n_samples=32)
    student_pt = args.out / "student.pt"
    info = StudentInfo("vit_s", ARCH_ARGS, norm, {"teacher": "none: random init (docs/scripts/make_demo_segmenter.py)"})
    save_student(student_pt, build_student("vit_s", **ARCH_ARGS), info)

    cfg = apply_overrides(FinetuneConfig(), {
        "student": str(student_pt), "data.root": str(args.data), "data.format": "dubai",
        "data.split": ("tile[1-6]",), "data.tile_size": 128, "data.num_workers": 0,
        "head.layers": (3, 4, 5, 6), "head.channels": 64, "head.unfreeze": True,
        "train.steps": args.steps, "train.batch_size": 8, "train.lr": 1e-3, "train.warmup_steps": 30,
        "train.checkpoint_every": args.steps, "train.device": "cpu"})
    result = finetune(cfg, args.out / "seg", overwrite=True)
    print(f"segmenter: {result.segmenter_path}")
    if args.eval_split:
        scores = evaluate(result.segmenter_path, args.data, "dubai", args.out / "eval", split=(args.eval_split,),
                          device="cpu", overwrite=True)
        print(scores.metrics.markdown_table())


if __name__ == "__main__":
    main()
