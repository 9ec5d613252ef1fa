"""Are a scene's border pixels predicted like its interior? (issue 19, item 7)

Windows at a scene's border put the border pixels at the window's edge, where the model sees less context and
the decoder's convolutions see zero padding. A model with an edge bias over-predicts one class along the first and
last rows and columns. This script measures it two ways for a ``segmenter.pt``:

* with ground truth (a labeled split, e.g. Dubai tiles 7-8): pixel accuracy in a ``--strip`` px band along the
  four borders against the accuracy inside, and each class's share of the border band against its share of the
  whole image, predicted and true;
* on georeferenced scenes without labels (``--scenes``): each class's share along each side against the whole
  scene (``cdkd segment``'s class raster);
* the edge effect itself, label-free (``--context``): the central part of each scene, cut out with a margin, is
  segmented alone, so its border pixels sit at window edges, and compared with the same pixels segmented inside the
  whole scene, where they have their real context; three times: without edge margin (``edge_context`` 0: windows
  end at the border), as the engine runs by default (``--edge-context``: windows reach past the border, filled by
  reflection) and with the cut-out reflect-padded by ``--pad`` px first and segmented without margin (the
  definition the engine's margin follows). Agreement in the border band against the interior says how much the
  missing context costs, and how much mirrored context gives back.

    python bench/border_bias.py --model runs/seg/segmenter.pt --data dubai/ --format dubai --split 'tile[7-8]' \
        --scenes ../shared/data/scenes/cogeo.tif ../shared/data/scenes/naip_4band.tif

It prints one table per part; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import rasterio

from cdkd.data.labeled import find_pairs, read_pair, schema_for
from cdkd.evaluation.semantic import predict_image
from cdkd.inference.runtimes import open_runtime
from cdkd.inference.sliding import runtime_predict
from cdkd.scene.core.options import SegmentOptions
from cdkd.scene.engine import segment_scene


def border_mask(h: int, w: int, strip: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[:strip], m[-strip:], m[:, :strip], m[:, -strip:] = True, True, True, True
    return m


def shares(classes: np.ndarray, k: int, where: np.ndarray) -> np.ndarray:
    values = classes[where]
    values = values[values < k]
    return np.bincount(values, minlength=k)[:k] / max(values.size, 1)


def labeled_part(runtime, data: str, fmt: str, split: list[str] | None, strip: int) -> dict:
    meta = runtime.meta
    schema = schema_for(fmt)
    predict = runtime_predict(runtime)
    ok_b = n_b = ok_i = n_i = 0
    k = meta.num_classes
    pred_b = np.zeros(k)
    pred_all = np.zeros(k)
    true_b = np.zeros(k)
    for pair in find_pairs(data, fmt, split):
        pixels, label = read_pair(pair, schema, meta.norm.bands)
        pred = predict_image(predict, meta, pixels)
        keep = label != schema.ignore_index
        edge = border_mask(*label.shape, strip)
        ok_b += int((pred == label)[edge & keep].sum())
        n_b += int((edge & keep).sum())
        ok_i += int((pred == label)[~edge & keep].sum())
        n_i += int((~edge & keep).sum())
        pred_b += np.bincount(pred[edge & keep], minlength=k)[:k]
        pred_all += np.bincount(pred[keep], minlength=k)[:k]
        true_b += np.bincount(label[edge & keep], minlength=k)[:k]
    return {
        "border_accuracy": ok_b / max(n_b, 1),
        "interior_accuracy": ok_i / max(n_i, 1),
        "predicted_border_share": (pred_b / max(pred_b.sum(), 1)).tolist(),
        "predicted_share": (pred_all / max(pred_all.sum(), 1)).tolist(),
        "true_border_share": (true_b / max(true_b.sum(), 1)).tolist(),
        "classes": list(schema.names),
    }


def scene_part(runtime, scenes: list[str], strip: int, bands: tuple[int, ...] | None) -> list[dict]:
    rows = []
    k = runtime.meta.num_classes
    with tempfile.TemporaryDirectory() as tmp:
        for i, scene in enumerate(scenes):
            out = Path(tmp) / f"s{i}.tif"
            segment_scene(scene, runtime, out, SegmentOptions(progress=False, bands=bands), log=lambda m: None)
            with rasterio.open(out) as src:
                classes = src.read(1)
            valid = classes != 255
            h, w = classes.shape
            sides = {
                "top": np.s_[:strip, :],
                "bottom": np.s_[-strip:, :],
                "left": np.s_[:, :strip],
                "right": np.s_[:, -strip:],
            }
            whole = shares(classes, k, valid)
            per_side = {}
            for name, sl in sides.items():
                m = np.zeros((h, w), dtype=bool)
                m[sl] = True
                per_side[name] = shares(classes, k, m & valid).tolist()
            worst = max(float(np.abs(np.asarray(s) - whole).max()) for s in per_side.values())
            rows.append({"scene": str(scene), "whole": whole.tolist(), "sides": per_side, "max_share_gap": worst})
    return rows


def _write(path: Path, array: np.ndarray, profile: dict) -> Path:
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)
    return path


def context_part(
    runtime,
    scenes: list[str],
    margin: int,
    pad: int,
    strip: int,
    bands: tuple[int, ...] | None,
    edge_context: int | None = None,
) -> list[dict]:
    """Per scene: agreement with the whole-scene prediction in the border band and inside, for the cut-out without
    edge margin, with the engine's (``edge_context``, None: its default) and reflect-padded by ``pad`` px."""
    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform

    rows = []
    opts = SegmentOptions(progress=False, bands=bands, edge_context=edge_context)
    no_margin = replace(opts, edge_context=0)
    with tempfile.TemporaryDirectory() as tmp:
        for i, scene in enumerate(scenes):
            with rasterio.open(scene) as src:
                h, w = src.height - 2 * margin, src.width - 2 * margin
                win = Window(margin, margin, w, h)
                cut = src.read(window=win)
                profile = dict(
                    driver="GTiff",
                    width=w,
                    height=h,
                    count=src.count,
                    dtype=src.dtypes[0],
                    crs=src.crs,
                    transform=window_transform(win, src.transform),
                    nodata=src.nodata,
                )
            whole_out = Path(tmp) / f"w{i}.tif"
            segment_scene(scene, runtime, whole_out, no_margin, log=lambda m: None)  # as the earlier numbers
            with rasterio.open(whole_out) as src:
                truth = src.read(1, window=win)
            plain = _write(Path(tmp) / f"c{i}.tif", cut, profile)
            padded_arr = np.pad(cut, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
            t = profile["transform"]
            padded = _write(
                Path(tmp) / f"p{i}.tif",
                padded_arr,
                dict(
                    profile,
                    width=w + 2 * pad,
                    height=h + 2 * pad,
                    transform=t * rasterio.Affine.translation(-pad, -pad),
                ),
            )
            result = {"scene": str(scene), "size": [h, w]}
            variants = (
                ("as_is", plain, 0, no_margin),
                ("engine", plain, 0, opts),
                ("reflect_padded", padded, pad, no_margin),
            )
            for name, path, off, options in variants:
                out = Path(tmp) / f"{name}{i}.tif"
                report = segment_scene(path, runtime, out, options, log=lambda m: None)
                result[f"{name}_edge_context"] = report.edge_context
                with rasterio.open(out) as src:
                    pred = src.read(1)[off : off + h, off : off + w]
                edge = border_mask(h, w, strip)
                valid = (truth != 255) & (pred != 255)
                same = pred == truth
                result[name] = {
                    "border_agreement": float(same[edge & valid].mean()),
                    "interior_agreement": float(same[~edge & valid].mean()),
                    "border_changed_to": np.bincount(
                        pred[edge & valid & ~same], minlength=runtime.meta.num_classes
                    ).tolist(),
                }
            rows.append(result)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data")
    ap.add_argument("--format", default="dubai")
    ap.add_argument("--split")
    ap.add_argument("--scenes", nargs="*", default=[])
    ap.add_argument("--bands", help="scene bands for --scenes, e.g. 1,2,3")
    ap.add_argument("--strip", type=int, default=4, help="border band width in px")
    ap.add_argument("--context", nargs="*", default=[], help="scenes for the label-free edge-effect part")
    ap.add_argument("--margin", type=int, default=128, help="--context: the cut-out's margin inside the scene")
    ap.add_argument("--pad", type=int, default=64, help="--context: reflect padding of the cut-out, in px")
    ap.add_argument("--edge-context", type=int, help="--context: the engine's edge margin (default: its own)")
    ap.add_argument("--json")
    args = ap.parse_args()
    runtime = open_runtime(args.model)
    names = list(runtime.meta.classes.names)
    result: dict = {"model": args.model, "strip": args.strip}
    if args.data:
        lab = labeled_part(runtime, args.data, args.format, args.split.split(",") if args.split else None, args.strip)
        result["labeled"] = lab
        print(
            f"labeled ({args.data}, {args.split}): accuracy border {100 * lab['border_accuracy']:.1f} % vs "
            f"interior {100 * lab['interior_accuracy']:.1f} % ({args.strip} px band)"
        )
        print(f"{'class':<14}{'pred border':>12}{'pred all':>10}{'true border':>12}")
        for n, a, b, c in zip(names, lab["predicted_border_share"], lab["predicted_share"], lab["true_border_share"]):
            print(f"{n:<14}{100 * a:>11.1f}%{100 * b:>9.1f}%{100 * c:>11.1f}%")
    if args.scenes:
        bands = tuple(int(b) for b in args.bands.split(",")) if args.bands else None
        result["scenes"] = scene_part(runtime, args.scenes, args.strip, bands)
        for row in result["scenes"]:
            print(
                f"{Path(row['scene']).name}: largest gap between a side's class share and the scene's: "
                f"{100 * row['max_share_gap']:.1f} points"
            )
            for side, s in row["sides"].items():
                print(f"   {side:<7}" + " ".join(f"{n[:8]:>9} {100 * v:5.1f}%" for n, v in zip(names, s)))
            print(f"   {'whole':<7}" + " ".join(f"{n[:8]:>9} {100 * v:5.1f}%" for n, v in zip(names, row["whole"])))
    if args.context:
        bands = tuple(int(b) for b in args.bands.split(",")) if args.bands else None
        result["context"] = context_part(
            runtime, args.context, args.margin, args.pad, args.strip, bands, args.edge_context
        )
        print(f"edge effect: agreement with the whole-scene prediction ({args.strip} px border band / interior)")
        for row in result["context"]:
            a, e, p = row["as_is"], row["engine"], row["reflect_padded"]
            print(
                f"  {Path(row['scene']).name:<16} no margin {100 * a['border_agreement']:5.1f} / "
                f"{100 * a['interior_agreement']:5.1f} %   engine (edge context {row['engine_edge_context']} px) "
                f"{100 * e['border_agreement']:5.1f} / {100 * e['interior_agreement']:5.1f} %   reflect-padded "
                f"{100 * p['border_agreement']:5.1f} / {100 * p['interior_agreement']:5.1f} %   border changed to "
                f"{a['border_changed_to']} / {e['border_changed_to']}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
