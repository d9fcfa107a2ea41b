#!/usr/bin/env bash
# Everything this project checks and measures on a GPU, in sections that each finish well inside
# 10 minutes on one H100. Results (logs, JSON) go to $OUT (default /tmp/gpu_suite).
#
#   bash benchmarks/gpu_suite.sh tests      # one section per device command: tests | mae | compile | ckpt | clip | dino | engines
#   bash benchmarks/gpu_suite.sh            # all of them (longer than one 10-minute device command)
#
# A GPU machine without this project's Python dependencies: put their wheels in .whl/ first
# (`make gpu-wheels` here: omegaconf, and DeepSpeed with its dependencies for the engines section) and they
# are installed into /tmp/site before anything runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(tests mae compile ckpt clip dino engines)
status=0
run() {  # run NAME CMD...: log to $OUT/NAME.log, remember a failure, go on with the next
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 25
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && echo "!! $name failed ($rc)" && status=1
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv >"$OUT/gpu.txt" 2>&1
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/gpu.txt"
import inspect
import torch
import torch.distributed.checkpoint as dcp
print("torch", torch.__version__, torch.cuda.get_device_name())
print("dcp.async_save", inspect.signature(dcp.async_save))
try:  # staging skips pinning empty shards (FSDP2 on several GPUs) only in newer torch
    from torch.distributed.checkpoint import _state_dict_stager as st
    print("pin_memory_min_bytes in stager:", "pin_memory_min_bytes" in inspect.getsource(st))
except ImportError as e:
    print("no _state_dict_stager:", e)
EOF

MAE=(--config configs/mae/vit_l16_in1k.yaml --interval 10 --windows 3 --repeats 1)
MAE_SET=(train.global_batch_size=256 data.backend=synthetic train.export_every=0)
# CLIP ViT-L/14 at 224 (both towers, text context 77), bf16, synthetic images + captions; 192 samples per
# step fit one 80 GB GPU without recomputation (MFU counts model FLOPs: 526 GFLOP/sample, 280 with FLIP 0.5)
CLIP=(--config configs/clip/vit_l14_laion400m.yaml --interval 10 --windows 3 --repeats 1)
CLIP_SET=(train.global_batch_size=192 data.backend=synthetic train.export_every=0 model.grad_checkpointing=false)
# DINO ViT-L/16 with the paper's speed-table crops (2 x 224 + 10 x 96), 64 images per step; synthetic data
# has no epoch length, so one is given (the last layer is frozen only in the discarded warm-up window)
DINO=(--config configs/dino/vit_l16_in1k.yaml --interval 10 --windows 3 --repeats 1)
DINO_SET=(train.global_batch_size=64 data.backend=synthetic method.local_crops=10 train.steps_per_epoch=10
    train.export_every=0 train.visualize_every=0)
for section in "${sections[@]}"; do
    case $section in
    tests)
        run pytest_gpu "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
        ;;
    mae) # issue 2's target: MAE ViT-L/16, one H100, bf16, >= 45 % MFU
        run mae_single "$PY" benchmarks/train_throughput.py "${MAE[@]}" --json "$OUT/mae_single.json" \
            "${MAE_SET[@]}" engine.name=single
        run mae_fsdp2 "$PY" benchmarks/train_throughput.py "${MAE[@]}" --json "$OUT/mae_fsdp2.json" \
            "${MAE_SET[@]}" engine.name=fsdp2
        ;;
    compile)
        run mae_single_compile "$PY" benchmarks/train_throughput.py "${MAE[@]}" \
            --json "$OUT/mae_single_compile.json" "${MAE_SET[@]}" engine.name=single train.compile=true
        run mae_fsdp2_compile "$PY" benchmarks/train_throughput.py "${MAE[@]}" \
            --json "$OUT/mae_fsdp2_compile.json" "${MAE_SET[@]}" engine.name=fsdp2 train.compile=true
        ;;
    ckpt) # pause per checkpoint (target <= 0.5 s with async saves) and resume time (<= 10 s);
        # the recipe's engine (FSDP2, one rank): DTensor shards through the pinned stager
        run ckpt "$PY" benchmarks/checkpoint_stall.py --config configs/mae/vit_l16_in1k.yaml --every 10 \
            --saves 4 --repeats 1 --json "$OUT/ckpt.json" train.global_batch_size=256 \
            engine.name=fsdp2 train.export_every=0
        ;;
    clip) # issue 13's targets: CLIP ViT-L/14, one H100, bf16: >= 600 samples/s; >= 1,200 with 50 % patch dropout
        run clip_l14 "$PY" benchmarks/train_throughput.py "${CLIP[@]}" --json "$OUT/clip_l14.json" \
            "${CLIP_SET[@]}" engine.name=fsdp2
        run clip_l14_flip "$PY" benchmarks/train_throughput.py "${CLIP[@]}" --json "$OUT/clip_l14_flip.json" \
            "${CLIP_SET[@]}" engine.name=fsdp2 method.patch_dropout=0.5
        ;;
    dino) # issue 12's target: DINO ViT-L/16, 2 x 224 + 10 x 96 crops, one H100, bf16, >= 330 images/s
        run dino_single "$PY" benchmarks/train_throughput.py "${DINO[@]}" --json "$OUT/dino_single.json" \
            "${DINO_SET[@]}" engine.name=single
        run dino_fsdp2 "$PY" benchmarks/train_throughput.py "${DINO[@]}" --json "$OUT/dino_fsdp2.json" \
            "${DINO_SET[@]}" engine.name=fsdp2
        ;;
    engines) # issue 14: MAE ViT-L/16 under each engine, side by side in one invocation (one GPU: the
        # partitioning has nothing to split, so this measures each engine's overhead; 8 GPUs: --nproc 8)
        run engines "$PY" benchmarks/train_throughput.py --config configs/mae/vit_l16_in1k.yaml --interval 10 \
            --windows 2 --repeats 1 --json "$OUT/engines.json" \
            --variant fsdp2="engine.name=fsdp2" \
            --variant zero1="engine.name=deepspeed engine.deepspeed.zero_stage=1" \
            --variant zero2="engine.name=deepspeed engine.deepspeed.zero_stage=2" \
            --variant zero3="engine.name=deepspeed engine.deepspeed.zero_stage=3" "${MAE_SET[@]}"
        ;;
    *)
        echo "unknown section '$section': valid are tests, mae, compile, ckpt, clip, dino, engines" >&2
        exit 2
        ;;
    esac
done
exit $status
