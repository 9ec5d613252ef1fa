#!/usr/bin/env bash
# Every GPU measurement of the project, in one go, for whoever gets a GPU for a few minutes (about 3.5 minutes
# on an H200): the scene engine on CUDA (torch bf16: engine / bare model ratio, tiles/s; ONNX Runtime's CUDA
# provider where onnxruntime-gpu is installed), a TensorRT FP16 engine built and run where TensorRT is
# installed, a distillation step (bf16), and the engine ceiling on this machine's CPUs. Each step has its own
# time limit and a failure does not stop the others. Results go to $OUT (or ./gpu-bench) as logs and
# JSON, packed into gpu-bench.tgz.
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

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.log, go on whatever happens
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - start)) s"; tail -n 25 "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| onnxruntime', o.__version__, o.get_available_providers())" | tee -a "$out/gpu.txt"

# 0. the GPU-only tests: device-side blending equals numpy's; the fused Mamba scan equals the PyTorch one (if installed)
step tests_cuda 90 python3 -m pytest -q -p no:cacheprovider tests/test_scene_pipeline.py tests/test_ssm_scan.py -k \
  "cuda or fused or torch_blend"
# 1. the engine with the real model (vit_s + UPerNet 512, 1024 px) on CUDA, bf16: engine / bare model
step overhead_cuda 120 python3 bench/scene.py --base "$base" --parts overhead --device cuda --overhead-factor 144 \
  --batch-size 8 --workdir "$work" --json "$out/overhead_cuda.json"
# 2. end-to-end throughput per runtime at 1024 px on the GPU: torch CUDA bf16, and ONNX Runtime's CUDA provider
#    where onnxruntime-gpu is installed (its wheel, ~300 MB, is too large to carry to a lent machine)
step throughput_cuda 120 python3 bench/scene.py --base "$base" --parts throughput --model-size full \
  --throughput-factor 144 --repeats 1 --batch-size 8 --runtimes torch --devices cuda --workdir "$work" \
  --json "$out/throughput_cuda.json"
# 3. TensorRT: export ONNX, build an FP16 engine, segment with it (skipped without the tensorrt package)
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
# 4. one distillation step, bf16, SAM vit_b teacher (random weights) -> vit_s student at 1024 px
step distill_cuda 120 python3 bench/distill_throughput.py --teachers vit_b --students vit_s --sizes 1024 \
  --batch-size 2 --steps 3 --amp bf16 --device cuda --json "$out/distill_cuda.json"
# 5. the students' forward on the GPU (bf16): global ViT-S vs windowed vs RS4D's state-space student
#    (2048 px left out: on an H200 that round did not finish inside the step's minute)
step students_cuda 60 python3 bench/student_speed.py --device cuda --sizes 512,1024 --batch 4 --repeats 5 \
  --json "$out/students_cuda.json"
# 6. the engine ceiling (free model) on this machine's CPUs, 8192 x 8192
step ceiling_cpu 60 python3 bench/scene.py --base "$base" --parts ceiling --ceiling-factor 64 --repeats 1 \
  --read-threads 4 --json "$out/ceiling.json"
tar -C "$(dirname "$out")" -czf "$(dirname "$out")/gpu-bench.tgz" run && rm -rf "$out"
echo "logs and JSON in $(dirname "$out")/gpu-bench.tgz"
