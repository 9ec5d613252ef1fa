#!/usr/bin/env bash
# Every GPU measurement of the project, in one go and under 8 minutes, for whoever gets a GPU for a few minutes:
# the CUDA tests (device-side blending, the Triton selective scan, SAM's fused attention), the scene engine on CUDA
# (torch bf16: engine / bare model ratio, tiles/s; ONNX Runtime's CUDA provider where onnxruntime-gpu is
# installed), a TensorRT FP16 engine built and run where TensorRT is installed, distillation steps (bf16: images/s,
# FLOPs, TFLOP/s and % of the card's measured bf16 matmul peak; eager vs compiled, SAM's attention vs the fused
# form; the data loader alone), the selective scan alone (Triton block sizes vs mamba_ssm vs PyTorch), the students
# and student + UPerNet tiles/s (eager vs compiled), and the engine ceiling on this machine's CPUs. Each step has
# its own time limit, cut to what is left of the 470 s budget, and a failure does not stop the others. Results go
# to $OUT (or ./gpu-bench) as logs and JSON, packed into gpu-bench.tgz; one summary table is printed at the end.
# How to read it: docs/gpu.md.
#
#   bash bench/gpu.sh                # from the repository root
#
# Without ../shared/data it makes its own scene (bench/scene.py --base synthetic). Python packages the machine
# lacks can travel as wheels in .whl/ (see the device tool's README); they are installed first when present.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-bench}/run"  # packed into one gpu-bench.tgz at the end (a lent machine returns few files)
mkdir -p "$out"
work=$(mktemp -d -t cdkd-gpu-XXXXXX)  # the model and mosaic the overhead and throughput steps share
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
base=cogeo.tif scene=../shared/data/scenes/cogeo.tif
if [ ! -f "$scene" ] || [ -n "${SYNTHETIC:-}" ]; then
  base=synthetic
  scene=$(python3 -c "import sys, tempfile, pathlib; sys.path.insert(0, 'bench'); import scene; \
print(scene.synthetic_base(pathlib.Path(tempfile.gettempdir()) / 'cdkd-bench-synthetic-base.tif'))")
fi

budget=${GPU_BENCH_BUDGET:-470}  # seconds for all steps together (the machine's start and the packing come on top)
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.log, go on whatever happens
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS))
  if [ "$left" -lt 15 ]; then echo "== $name: skipped (budget spent)" | tee "$out/$name.log"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $((SECONDS - start))" >> "$out/steps.txt"
  echo "   exit $rc after $((SECONDS - start)) s"; tail -n 25 "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| onnxruntime', o.__version__, o.get_available_providers())" | tee -a "$out/gpu.txt"

# Most wanted first: whatever the budget cuts comes last.
# 0. the GPU-only tests: device-side blending equals numpy's; the fused Mamba scans (Triton; mamba_ssm if installed)
#    equal the PyTorch one in values and gradients; SAM's fused attention (sdpa, flex) equals segment-anything's
step tests_cuda 150 python3 -m pytest -q -p no:cacheprovider tests/test_scene_pipeline.py tests/test_ssm_scan.py \
  tests/test_scan_triton.py tests/test_sam_attention.py tests/test_blend_triton.py tests/test_cuda_graph.py \
  -k "cuda or fused or torch_blend or triton or sdpa or flex"
# 1. the selective scan alone: Triton block sizes vs mamba_ssm (if installed) vs the chunked PyTorch form
step scan_kernel 60 python3 bench/scan_kernel.py --tiles 4 --size 1024 --json "$out/scan_kernel.json"
# 2. the students' forward on the GPU (bf16): global ViT-S vs windowed vs RS4D's state-space student (its scan now
#    the fused Triton kernel)
step students_cuda 75 python3 bench/student_speed.py --device cuda --sizes 512,1024,2048 --batch 4 --repeats 5 \
  --json "$out/students_cuda.json"
# 3. distillation, bf16, SAM vit_b teacher (random weights) -> vit_s student at 1024 px: the earlier measurement's
#    setting (batch 2, segment-anything's attention, eager), then batch 8 with the fused attention (and the data
#    loader alone), then the blocks compiled too (the CUDA default); FLOPs per step, TFLOP/s, % of the bf16 matmul
#    peak measured in the same run
step distill_baseline 90 python3 bench/distill_throughput.py --teachers vit_b --students vit_s --sizes 1024 \
  --batch-size 2 --steps 3 --amp bf16 --device cuda --compile off --attention sam --json "$out/distill_baseline.json"
step distill_fused 100 python3 bench/distill_throughput.py --teachers vit_b --students vit_s --sizes 1024 \
  --batch-size 8 --steps 3 --amp bf16 --device cuda --compile off --attention sdpa --loader --workers 8 \
  --json "$out/distill_fused.json"
step distill_compiled 150 python3 bench/distill_throughput.py --teachers vit_b --students vit_s --sizes 1024 \
  --batch-size 8 --steps 2 --amp bf16 --device cuda --compile on --attention sdpa --no-flops \
  --json "$out/distill_compiled.json"
# 4. the engine with the real model (vit_s + UPerNet 512, 1024 px) on CUDA, bf16: engine / bare model, eager with the
#    torch blend (as before), then a CUDA graph with the Triton blend (the default)
step overhead_cuda 110 python3 bench/scene.py --base "$base" --parts overhead --device cuda --overhead-factor 144 \
  --batch-size 8 --workdir "$work" --json "$out/overhead_cuda.json"
# 5. end-to-end throughput per runtime at 1024 px on the GPU: torch CUDA bf16, and ONNX Runtime's CUDA provider
#    where onnxruntime-gpu is installed (its wheel, ~300 MB, is too large to carry to a lent machine)
step throughput_cuda 75 python3 bench/scene.py --base "$base" --parts throughput --model-size full \
  --throughput-factor 144 --repeats 1 --batch-size 8 --runtimes torch --devices cuda --workdir "$work" \
  --json "$out/throughput_cuda.json"
# 6. student + UPerNet 512 / 256 at 1024 px, eager vs compiled: the bare model's tiles/s (rows saved as they come)
step segmenters_cuda 150 python3 bench/student_speed.py --device cuda --segmenters-only --segmenters 512,256 \
  --seg-size 1024 --compile both --batch 8 --repeats 3 --json "$out/segmenters_cuda.json"
# 7. TensorRT: export ONNX, build an FP16 engine, segment with it (skipped without the tensorrt package)
if python3 -c "import tensorrt" 2>/dev/null; then
  w=$(mktemp -d)
  python3 -c "import sys, pathlib; sys.path.insert(0, 'bench'); import scene; \
scene.build_segmenter(pathlib.Path('$w/seg.pt'), 'full', 1024, (1, 2, 3), 'uint8')"
  step onnx_export 150 python3 -m cli.main export "$w/seg.pt" --format onnx --out "$w/m.onnx" --batch-size 8
  step tensorrt_build 200 python3 -m cli.main export "$w/m.onnx" --format tensorrt --fp16 --out "$w/m.engine"
  step tensorrt_segment 100 python3 -m cli.main segment "$scene" --engine "$w/m.engine" --out "$w/lc.tif" \
    --batch-size 8 --no-progress
  cp "$w/lc.json" "$out/tensorrt_segment.json" 2>/dev/null
else
  echo "== tensorrt: skipped (no tensorrt package here)" | tee "$out/tensorrt.log"
fi
# 8. the engine ceiling (free model) on this machine's CPUs, 8192 x 8192
step ceiling_cpu 45 python3 bench/scene.py --base "$base" --parts ceiling --ceiling-factor 64 --repeats 1 \
  --read-threads 4 --json "$out/ceiling.json"

python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
print("\n=== summary (" + ((out / "gpu.txt").read_text().splitlines() or ["?"])[0] + ") ===")
print(f"{'what':58} {'result':>30}")
def line(what, result):
    print(f"{what:58} {result:>30}")
for ln in (out / "steps.txt").read_text().splitlines() if (out / "steps.txt").exists() else []:
    name, rc, sec = ln.split()
    line(f"step {name}", f"{'ok' if rc == '0' else 'TIMEOUT' if rc in ('124', '137') else 'exit ' + rc}, {sec} s")
o = load("overhead_cuda.json")
r = (o or {}).get("overhead", {}).get("result") or {}
for v in r.get("variants", [r] if r else []):
    how = f"graph {'on' if v.get('cuda_graph') is True else 'off'}, blend {v.get('blend')}"
    line(f"engine / bare model (vit_s+UPerNet 512, 1024, bf16; {how})",
         f"{v['ratio']:.2f} ({v['tiles_s']:.0f} / {v.get('model_tiles_s', 0):.0f} tiles/s)")
runs = [load(f"distill_{name}.json") or {} for name in ("baseline", "fused", "compiled")]
peak = next((r["peak"]["tflops"] for r in runs if r.get("peak", {}).get("tflops")), None)
if peak:
    line("bf16 matmul peak (8192^3)", f"{peak:.0f} TFLOP/s")
# The model's FLOPs per image do not depend on the attention form, compiling or the batch: one count serves all.
per_image = next((x["gflop_per_step"] / x["batch"] for r in runs for x in r.get("rows", []) if x.get("gflop_per_step")),
                 None)
for row in (x for r in runs for x in r.get("rows", [])):
    tf = per_image * row["batch"] / row["s_per_step"] / 1e3 if per_image else None
    what = f"distill vit_b->vit_s 1024 px b{row['batch']} attn={row['attention']} compile={row['compile']}"
    frac = f", {100 * tf / peak:.0f}% peak" if tf and peak else ""
    line(what, f"{row['images_per_s']:.1f} img/s, {tf or 0:.0f} TFLOP/s{frac}")
for lr in (x for r in runs for x in r.get("loader", [])):
    line(f"data loader alone ({lr.get('workers')} workers, {lr.get('size')} px)", f"{lr.get('images_per_s')} img/s")
for row in (load("scan_kernel.json") or {}).get("rows", []):
    res = row.get("error", "")[:30] or f"{row['fwd_ms']:.2f} / {row['fwd_bwd_ms']:.2f} ms"
    line(f"scan {row['name']} fwd / fwd+bwd", res)
for block in (load("students_cuda.json") or {}).get("sizes", []):
    for name, m in block["models"].items():
        line(f"student {name} forward {block['size']} px batch 4",
             f"{m['median_s'] * 1e3:.1f} ms ({m['time_vs_vit_s']:.2f}x vit_s)")
for row in (load("segmenters_cuda.json") or {}).get("segmenters", {}).get("rows", []):
    eager, comp, graphed = (row.get(f"{k}_tiles_s") for k in ("eager", "compiled", "graphed"))
    res = f"{eager or 0:.0f} eager / {graphed or 0:.0f} graph / {comp or 0:.0f} compiled tiles/s"
    line(f"{row['model']} + UPerNet {row['channels']} ({row['size']} px, b{row['batch']})", res)
ce = ((load("ceiling.json") or {}).get("ceiling") or {}).get("best")
if ce:
    line("engine ceiling on the CPUs (free model)", f"{ce['tiles_s']:.0f} tiles/s")
PY
tar -C "$(dirname "$out")" -czf "$(dirname "$out")/gpu-bench.tgz" run && rm -rf "$out"
echo "logs and JSON in $(dirname "$out")/gpu-bench.tgz"
