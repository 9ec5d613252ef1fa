"""What the decoder costs next to the encoder: a ViT-S student + UPerNet of several widths (and the linear head).

    python bench/decoder_cost.py [--tile 512] [--batch 1] [--channels 512,256,128] [--repeats 3]

Times one forward pass of a random-weight ``Segmenter`` (inference mode, float32) split into encoder and
decoder by ``cdkd.evaluation.semantic.StageTimer``, the hooks ``cdkd evaluate`` uses; medians over ``--repeats``
after one warm-up, the models taking turns (other load falls on all alike). Prints a table and the ratios to
the default width (512) measured in this run.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from cdkd.evaluation.semantic import StageTimer
from cdkd.models.student import build_student
from cdkd.models.upernet import Segmenter, count_parameters


def measure(models: list[torch.nn.Module], x: torch.Tensor, repeats: int) -> list[tuple[float, float]]:
    """Median (encoder, decoder) seconds of one forward pass of each model on ``x``; the models take turns in
    every repeat, so load from other processes falls on all of them alike."""
    times: list[list[tuple[float, float]]] = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            model(x)  # warm-up
        for _ in range(repeats):
            for model, out in zip(models, times):
                timer = StageTimer(model)
                model(x)
                timer.remove()
                out.append((timer.encoder_s, timer.decoder_s))
    return [(statistics.median(e for e, _ in t), statistics.median(d for _, d in t)) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--channels", default="512,256,128")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    encoder = build_student("vit_s", img_size=args.tile)
    x = torch.randn(args.batch, 3, args.tile, args.tile, device=device)
    heads = [("upernet", int(c)) for c in args.channels.split(",")] + [("linear", 1)]
    models = [Segmenter(encoder, 6, head=h, channels=c).to(device).eval() for h, c in heads]
    rows = [
        (f"{h} {c}" if h == "upernet" else "linear", count_parameters(m.decoder_modules()) / 1e6, enc, dec)
        for (h, c), m, (enc, dec) in zip(heads, models, measure(models, x, args.repeats))
    ]
    print(
        f"vit_s + decoder, {args.tile} px, batch {args.batch}, {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}"
    )
    print("| decoder | decoder params | encoder s | decoder s | decoder share | forward vs upernet 512 |")
    print("|---|---|---|---|---|---|")
    base = rows[0][2] + rows[0][3]
    for name, params, enc, dec in rows:
        print(
            f"| {name} | {params:.1f} M | {enc:.2f} | {dec:.2f} | {100 * dec / (enc + dec):.0f} % | "
            f"{(enc + dec) / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
