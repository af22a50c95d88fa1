#!/bin/bash
# The full-budget benchmark on a lent GPU machine (the tool library's `device`), as run for the README's
# H200 table. Before the call, here: put the MNIST files where the command can carry them,
#   mkdir -p .gpu_data/MNIST/raw && cp ../shared/data/MNIST/raw/*.gz .gpu_data/MNIST/raw/
# (`.gpu_data/` is ignored by git: add `/.gpu_data/` to .git/info/exclude), then run
#   bash scripts/gpu_benchmark.sh   with carry [".gpu_data"]   and SECONDS_PER_MODEL=25 (or more).
# Each model runs as its own `course benchmark --only` call, so one failure costs only its row; the
# last call reuses every row and writes the table and figures to $OUT.
export COURSE_DATA_DIR=$PWD/.gpu_data COURSE_CHECKPOINT_DIR=/tmp/ck COURSE_TEST_SPLIT=1 PYTHONPATH=$PWD \
       PYTHONUNBUFFERED=1 MPLBACKEND=Agg CI=true
SECONDS_PER_MODEL=${SECONDS_PER_MODEL:-25}
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.is_available())"
python3 -m course_utils.cli train classifier --budget full --test-split --max-seconds 40 --out /tmp/classifier \
  2>&1 | grep -v "^  floor" | tail -8
cp /tmp/classifier/metrics.json $OUT/classifier_metrics.json
for m in ae vae dcgan made gated-pixelcnn ddpm ddpm-binary; do
  echo "== $m at $(( $(date +%s) - start )) s"
  timeout 70 python3 -m course_utils.cli benchmark --budget full --test-split --only $m \
    --max-seconds $SECONDS_PER_MODEL --out /tmp/full > /tmp/$m.log 2>&1; echo "rc $?"; grep -v "^|" /tmp/$m.log | tail -12
done
echo "== table at $(( $(date +%s) - start )) s"
timeout 60 python3 -m course_utils.cli benchmark --budget full --test-split --max-seconds $SECONDS_PER_MODEL \
  --out /tmp/full > $OUT/final.log 2>&1
tail -30 $OUT/final.log
cp /tmp/full/benchmark.json /tmp/full/benchmark.md /tmp/full/samples.png /tmp/full/tradeoffs.png $OUT/ 2>/dev/null
echo "== done at $(( $(date +%s) - start )) s"
