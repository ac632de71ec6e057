#!/bin/bash
# One GPU visit's measurements (issue 20), each part under its own timeout, logs into $OUT.
#   ../shared/gpu/prepare-carry.sh   # here, venv active; then on the GPU machine:
#   bash experiments/bench/gpu_visit.sh
export PYTHONPATH=$PWD/.gpu-site PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu_visit}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/hardware.txt" 2>&1
python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)' >> "$out/hardware.txt" 2>&1
timeout ${BENCH_S:-280} python3 experiments/bench/bench_gpu.py --peak-tflops 790 --epochs 2 --train-per-class 250 \
  --modes fp32 bf16 bf16+compile bf16+cudagraphs --compile-batches 128 256 > "$out/bench_gpu.log" 2>&1
echo "rc=$?" >> "$out/bench_gpu.log"
timeout ${PROTOCOL_S:-140} python3 experiments/bench/bench_protocol.py --epochs 3 > "$out/bench_protocol.log" 2>&1
echo "rc=$?" >> "$out/bench_protocol.log"
timeout ${JPEG_S:-150} python3 experiments/bench/bench_jpeg.py --images 4000 > "$out/bench_jpeg.log" 2>&1
echo "rc=$?" >> "$out/bench_jpeg.log"
timeout ${METHODS_S:-120} python3 experiments/bench/bench_methods.py --cases simplecil simplecil+nocache gan_replay \
  --seeds 1993 --out "$out/bench_methods" > "$out/bench_methods.log" 2>&1
echo "rc=$?" >> "$out/bench_methods.log"
timeout ${TESTS_S:-130} python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_device_data.py tests/test_jpeg_path.py \
  > "$out/tests.log" 2>&1
echo "rc=$?" >> "$out/tests.log"
tail -n 30 "$out"/*.log
