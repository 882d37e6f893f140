#!/bin/bash
# The GPU run that trained the bundled default model (one H200, 451 s). It expects the
# pre-tokenized sources as .gpu/data/<name>/{meta.json,val.bin,train.bin.xz} (made from
# OUT/data-cache/ of a local `gpts-edge train` run, train.bin compressed with xz) and writes the
# checkpoint, metrics and optimizer state to $OUT.
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
mkdir -p /tmp/pkg && cp -r gpts_edge /tmp/pkg/ && cp -r training /tmp/pkg/gpts_edge/training \
  && cp -r export /tmp/pkg/gpts_edge/export && cp -r runtimes /tmp/pkg/gpts_edge/runtimes
export PYTHONPATH=/tmp/pkg
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch,sys; print('torch', torch.__version__, sys.version.split()[0])"
DATA=""
for d in .gpu/data/*; do
  n=$(basename $d); mkdir -p /tmp/data/$n; cp $d/meta.json $d/val.bin /tmp/data/$n/
  xz -d -T0 -c $d/train.bin.xz > /tmp/data/$n/train.bin &
done
wait
declare -A W=( [wikipedia]=0.55 [openstax]=0.35 [pythondocs]=0.03 [gsm8k]=0.03 [d2l]=0.02 [factbook]=0.02 )
for n in "${!W[@]}"; do DATA="$DATA --data /tmp/data/$n:${W[$n]}"; done
echo "data ready after $(( $(date +%s) - T0 )) s"; du -sh /tmp/data
LIMIT=${LIMIT:-500}
run() {
  (cd /tmp/pkg && python3 -m gpts_edge.cli train --preset gpt-s-1.4m $DATA --out /tmp/run --batch-size 256 --grad-accum 1 \
    --lr 3.5e-3 --warmup 500 --time-limit $1 --eval-every 500 --ckpt-every 2000 --log-every 50 \
    --no-progress "${@:2}") 2>&1 | tee -a $OUT/train.log
  return ${PIPESTATUS[0]}
}
run $LIMIT --compile
rc=$?
if [ $rc -ne 0 ] && [ $(( $(date +%s) - T0 )) -lt 150 ]; then
  echo "compiled run failed (rc=$rc); retrying without compile" | tee -a $OUT/train.log
  rm -rf /tmp/run; run $(( LIMIT - 100 )); rc=$?
fi
S=$(ls -d /tmp/run/checkpoints/step-* | tail -1)
cp /tmp/run/model.safetensors /tmp/run/metrics.jsonl /tmp/run/loss.png $OUT/ 2>/dev/null
cp $S/optimizer.safetensors $S/train_state.json $OUT/ 2>/dev/null
echo "done rc=$rc after $(( $(date +%s) - T0 )) s"
