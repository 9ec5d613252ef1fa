"""Device work the engine's blend asks for per window, torch form against the Triton kernels, counted on the CPU.

On a GPU every non-view torch operation the blender dispatches is at least one kernel launch from the thread that
feeds the GPU, and each costs that thread microseconds of Python and driver time under the interpreter lock. This
runs the blender over a plan of random logits with each backend and counts, per window and per window row:

- the non-view aten operations it dispatches (``TorchDispatchMode``: views launch nothing, allocations are counted
  though they launch nothing, so the count is an upper bound of the kernels);
- the Triton kernel launches (the triton backend runs in Triton's interpreter here, so the script re-executes
  itself with ``TRITON_INTERPRET=1`` set before triton is imported).

    python bench/blend_launches.py                      # 256 px tiles, overlap 32, 6 classes, 1536 px wide: ~40 s
    python bench/blend_launches.py --tile 1024 --overlap 64 --width 6144 --margin 64 --json out.json  # ~10 min

The counts depend on the plan's shape (windows per row, classes), not on the tile size or the machine; the
interpreter's time grows with the pixels. The run also checks that the two backends give the same class ids.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count(backend: str, tile: int, overlap: int, width: int, rows: int, classes: int, margin: int) -> dict:
    from cdkd.inference import blend_triton
    from cdkd.inference.blend import window_weights
    from cdkd.inference.rowblend import PlanBlender
    from cdkd.inference.tiler import plan_rows

    height = tile + (rows - 1) * (tile - overlap)
    plan = plan_rows(height, width, tile, overlap, margin)
    tops, cols = [r[0].row for r in plan], [w.col for w in plan[0]]
    blender = PlanBlender(classes, tops, cols, (tile, tile), (height, width), "cpu", probs=True, backend=backend)
    launches = Counter()
    for name in ("add_window", "reduce_rows"):
        original = getattr(blend_triton, name)

        def counted(*args, _name=name, _f=original, **kw):
            launches[_name] += 1
            with _disable_current_modes():  # the interpreter's own copies of the kernel's arguments are not ours
                return _f(*args, **kw)

        setattr(blend_triton, name, counted)
    rng = np.random.default_rng(0)
    weights = {w: torch.from_numpy(window_weights(w, height, width, overlap, margin=margin)) for r in plan for w in r}
    inputs = [
        [
            (
                torch.from_numpy(rng.normal(size=(classes, tile, tile)).astype(np.float32)),
                torch.ones(tile, tile, dtype=torch.bool),
            )
            for _ in r
        ]
        for r in plan
    ]
    windows = sum(len(r) for r in plan)
    adds, ends = _Count(), _Count()
    out = []
    for i, r in enumerate(plan):
        with adds:
            blender.begin(i)
            for w, (logits, valid) in zip(r, inputs[i]):
                blender.add(w, logits, weights[w], valid)
        with ends:
            _, fin = blender.end(i)
        out.append(np.asarray(fin.classes))
    return {
        "backend": backend,
        "windows": windows,
        "window_rows": len(plan),
        "ops_per_window": sum(adds.ops.values()) / windows,
        "ops_per_row_end": sum(ends.ops.values()) / len(plan),
        "triton_launches_per_window": launches["add_window"] / windows,
        "triton_launches_per_row_end": launches["reduce_rows"] / len(plan),
        "top_ops": dict((adds.ops + ends.ops).most_common(6)),
        "classes_sha": __import__("hashlib").sha256(np.concatenate(out).tobytes()).hexdigest()[:16],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--rows", type=int, default=2, help="window rows")
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--margin", type=int, default=32, help="edge context (px)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", help=argparse.SUPPRESS)  # the interpreted child's backend
    args = parser.parse_args()
    sizes = (args.tile, args.overlap, args.width, args.rows, args.classes, args.margin)
    if args.only:
        print(json.dumps(count(args.only, *sizes)))
        return
    torch_row = count("torch", *sizes)
    env = dict(os.environ, TRITON_INTERPRET="1")
    child = subprocess.run(
        [sys.executable, __file__, "--only", "triton", *sys.argv[1:]], env=env, capture_output=True, text=True
    )
    if child.returncode:
        sys.exit(child.stderr[-2000:])
    triton_row = json.loads(child.stdout.strip().splitlines()[-1])
    print(
        f"blend work per window ({args.tile} px tiles, overlap {args.overlap}, {args.classes} classes, "
        f"{args.width} px wide, edge context {args.margin}; {torch_row['windows']} windows in "
        f"{torch_row['window_rows']} rows)"
    )
    print(
        f"{'backend':8} {'torch ops/window':>17} {'triton launches/window':>23} {'torch ops/row end':>18} {'triton/row end':>15}"
    )
    for r in (torch_row, triton_row):
        print(
            f"{r['backend']:8} {r['ops_per_window']:17.1f} {r['triton_launches_per_window']:23.1f} "
            f"{r['ops_per_row_end']:18.1f} {r['triton_launches_per_row_end']:15.1f}"
        )
    same = torch_row["classes_sha"] == triton_row["classes_sha"]
    print(f"class ids identical: {same}; torch form's most frequent ops: {torch_row['top_ops']}")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch_row, "triton": triton_row, "same_classes": same}, indent=2))


if __name__ == "__main__":
    main()
