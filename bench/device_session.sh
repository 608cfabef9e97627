#!/usr/bin/env bash
# The GPU session's two calls on the device tool (docs/cifar10.md, "GPU run"). The real CIFAR-10
# train.tar (77 MB) does not fit one 64 MiB call, so it travels as two byte ranges over two calls
# on the same warm machine; everything else the run needs travels in the first:
#
#   part1  carry .whl (zarr, numcodecs, webdataset and their needs, which the machine lacks) and
#          .gpudata/{test.tar,train.part1,smoke}: installs the wheels into /tmp/site, keeps the
#          data in /tmp/c10, checks the versions, and runs the tiny CUDA smoke run of
#          experiments/cifar10_gpu.py on a real 20-images-per-class slice (every stage on the GPU).
#   part2  carry .gpudata/train.part2: joins train.tar, checks its sha256 (TRAIN_SHA) and runs the
#          full-set run sized to BUDGET seconds, killed (SIGTERM, JSON kept) at LIMIT seconds.
#   r56    instead of part2, the real-data protocol (issue 19): carry .gpudata/train.part2 and
#          .gpudata/resnet56-4bfd9763.th (the published weights, 3.4 MB); joins and checks train.tar
#          like part2 and runs `experiments.cifar10_gpu --protocol r56` (imported resnet56 fine-tuned,
#          10 views, 3 seeds x 5 methods) sized to BUDGET (default 480 s), killed at LIMIT.
#   bench20 instead of part2, issue 20's GPU rows: carry .gpudata/train.part2, the published weights
#          .gpudata/resnet{20,56}-*.th and .gpudata/imagenet-part.tar (the first ~150 JPEGs of
#          imagenet-sample/val.tar); joins and checks train.tar, lays the data out as ../shared/data
#          is (AEKT_SHARED_DATA) and runs `bench.run_all --device cuda` for loader (epoch vs the
#          student_step ceiling at 64/256/1024, JPEG vs raw loader), stage1 (vs forward-only, real
#          CIFAR-10), precision (bf16/fp16 KL vs fp32) and decode (nvJPEG), killed at LIMIT (480 s).
#
# Results come back through $OUT: the run's JSON, the rendered results page and a tarball of the
# stage logs, metrics and per-epoch CSVs. AEKT_GIT_COMMIT / AEKT_GIT_CLEAN name the commit measured
# (the copy on the machine has no .git).
set -uo pipefail
SITE=/tmp/site
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ ! -d "$SITE/zarr" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
fi
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
case "${1:-}" in
  part1)
    mkdir -p /tmp/c10 && cp .gpudata/test.tar .gpudata/train.part1 /tmp/c10/ || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, torchvision, zarr, numcodecs, webdataset, accelerate, safetensors
print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'zarr', zarr.__version__,
      'accelerate', accelerate.__version__, torch.cuda.get_device_name(), 'cpus', __import__('os').cpu_count())" || exit 1
    timeout -s TERM 150 python3 -m experiments.cifar10_gpu --tiny --data-root .gpudata/smoke --losses aekt \
      --budget-s 60 --teacher-epochs 1 --student-epochs 2 --work-dir /tmp/smoke --out-dir "$OUT" \
      --results-md /tmp/smoke.md
    rc=$?
    tar czf "$OUT/smoke-logs.tgz" -C /tmp/smoke logs
    exit $rc ;;
  part2)
    cat /tmp/c10/train.part1 .gpudata/train.part2 > /tmp/c10/train.tar || exit 1
    echo "${TRAIN_SHA:?}  /tmp/c10/train.tar" | sha256sum -c || exit 1
    rm -f /tmp/c10/train.part1
    timeout -s TERM "${LIMIT:?}" python3 -m experiments.cifar10_gpu --data-root /tmp/c10 --budget-s "${BUDGET:?}" \
      --teacher-epochs 30 --student-epochs 15 --work-dir /tmp/run --out-dir "$OUT" \
      --results-md "$OUT/results-cifar10.md"
    rc=$?
    tar czf "$OUT/run-logs.tgz" -C /tmp/run logs metrics plots
    exit $rc ;;
  bench20)
    cat /tmp/c10/train.part1 .gpudata/train.part2 > /tmp/c10/train.tar || exit 1
    echo "${TRAIN_SHA:?}  /tmp/c10/train.tar" | sha256sum -c || exit 1
    rm -f /tmp/c10/train.part1
    mkdir -p /tmp/shared/cifar10-resnets /tmp/shared/imagenet-sample
    ln -sfn /tmp/c10 /tmp/shared/cifar10-images
    cp .gpudata/resnet*.th /tmp/shared/cifar10-resnets/ && cp .gpudata/imagenet-part.tar /tmp/shared/imagenet-sample/val.tar || exit 1
    AEKT_SHARED_DATA=/tmp/shared timeout -s TERM "${LIMIT:-480}" python3 -m bench.run_all --device cuda \
      --only loader,stage1,precision,decode --out-dir "$OUT"
    exit $? ;;
  r56)
    cat /tmp/c10/train.part1 .gpudata/train.part2 > /tmp/c10/train.tar || exit 1
    echo "${TRAIN_SHA:?}  /tmp/c10/train.tar" | sha256sum -c || exit 1
    rm -f /tmp/c10/train.part1
    timeout -s TERM "${LIMIT:?}" python3 -m experiments.cifar10_gpu --protocol r56 --data-root /tmp/c10 \
      --teacher-checkpoint .gpudata/resnet56-4bfd9763.th --budget-s "${BUDGET:-480}" --work-dir /tmp/run \
      --out-dir "$OUT" --results-md "$OUT/results-cifar10.md"
    rc=$?
    tar czf "$OUT/run-logs.tgz" -C /tmp/run logs metrics plots
    exit $rc ;;
  *) echo "usage: bench/device_session.sh part1|part2|r56" >&2; exit 2 ;;
esac
