"""Make ``docs/assets/demo_preview.png`` (the picture in README.md and on the docs' home page) from a demo run.

    cdkd demo --out cdkd_demo
    python docs/scripts/demo_preview.py cdkd_demo

The picture is cdkd's own quick look (what ``cdkd segment --preview`` writes): the demo's synthetic scene beside
the class raster that the demo's exported ONNX model made of it, with the legend; reduced to a palette of
``--colors`` colours so that it stays small in the repository. Not a page of the site (``mkdocs.yml`` excludes
``*.py`` under docs/).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cdkd.scene.preview import write_preview

OUT = Path(__file__).resolve().parents[1] / "assets" / "demo_preview.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="the --out folder of a finished `cdkd demo`")
    parser.add_argument("--max-size", type=int, default=400, help="longest side of each panel in px")
    parser.add_argument("--colors", type=int, default=64, help="palette size of the PNG")
    args = parser.parse_args()
    out = write_preview(args.demo / "data" / "scene.tif", args.demo / "landcover.tif", OUT,
                        max_size=args.max_size, overwrite=True)
    from PIL import Image  # matplotlib's own dependency

    with Image.open(out) as image:
        small = image.convert("RGB").quantize(colors=args.colors, method=Image.Quantize.MEDIANCUT)
    small.save(out, optimize=True)
    print(f"{out}: {out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
