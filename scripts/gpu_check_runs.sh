#!/bin/bash
# GPU check of a run's communicator, end states and clean exit (issue 12); docs/train.md has its output.
# Usage, from the repository root on a CUDA machine: bash scripts/gpu_check_runs.sh [MNIST folder]
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
PY=python3
MNIST=${1:-../shared/data/mnist}  # on the device machine: a carried copy (../shared does not travel)
R=/tmp/r12
rm -rf $R; mkdir -p $R
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
COMMON=(--config jobs/configs/smoke.toml data.name=mnist "data.path='$MNIST'" run.tensorboard=false run.epochs=2)
show() { $PY - "$1" <<'PY'
import json, sys
s = json.load(open(sys.argv[1] + "/summary.json")); c = json.load(open(sys.argv[1] + "/config.json"))["derived"]
print(f"  end={s['end']} reason={str(s['reason'])[:90]!r} steps={s['steps']} test_acc={s['test_accuracy']} device={c['device']} ranks={c['world_size']} dist={c['distributed']}")
PY
}
for opt in sgd kfac; do
  timeout 120 $PY -m jobs.train "${COMMON[@]}" optim.name=$opt "run.out_dir='$R/one-$opt'" > $R/one-$opt.log 2>&1; echo "1 rank cuda $opt: exit $?"; show $R/one-$opt
done
timeout 120 $PY -m jobs.train "${COMMON[@]}" optim.lr=1e12 "run.out_dir='$R/div'" > $R/div.log 2>&1; echo "1 rank cuda diverging: exit $? (3 expected)"; show $R/div
for cfg in "sgd gloo false" "sgd gloo true" "kfac gloo false" "sgd nccl false"; do
  set -- $cfg
  out=$R/two-$1-$2-ddp$3
  timeout 150 $PY -m torch.distributed.run --standalone --nproc-per-node=2 -m jobs.train "${COMMON[@]}" optim.name=$1 run.backend=$2 run.ddp=$3 "run.out_dir='$out'" > $out.log 2>&1
  echo "2 ranks on one GPU, $1 backend=$2 ddp=$3: exit $?"; [ -f $out/summary.json ] && show $out || grep -m3 -i "error" $out.log | cut -c1-240
done
# A checkpoint corrupted on one rank (issue 13): two ranks stop after step 12, rank 1's newest file is truncated,
# the resume takes the checkpoint before it and must end with the uninterrupted run's accuracy.
out=$R/corrupt
timeout 150 $PY -m torch.distributed.run --standalone --nproc-per-node=2 -m jobs.train "${COMMON[@]}" run.backend=gloo run.stop_after_steps=12 "run.out_dir='$out'" > $out-1.log 2>&1
newest=$(ls $out/checkpoints/*.rank1.pt | sort | tail -1); truncate -s 100 "$newest"
timeout 150 $PY -m torch.distributed.run --standalone --nproc-per-node=2 -m jobs.train "${COMMON[@]}" run.backend=gloo run.resume=true "run.out_dir='$out'" > $out-2.log 2>&1
echo "2 ranks, rank 1's newest checkpoint truncated, resumed: exit $?"; grep -m2 "corrupt\|resuming from" $out-2.log | cut -c1-200; show $out
# The exit-time abort: 10 two-rank gloo runs of the clean-exit path (jobs.train leaves through distkfac.comm.leave).
fails=0; for i in $(seq 1 10); do
  timeout 120 $PY -m torch.distributed.run --standalone --nproc-per-node=2 -m jobs.train "${COMMON[@]}" run.epochs=1 data.train_examples=256 run.backend=gloo "run.out_dir='$R/rep$i'" > $R/rep$i.log 2>&1 || { fails=$((fails+1)); grep -m1 -i "terminate\|error" $R/rep$i.log; }
done; echo "10 two-rank gloo runs on CUDA: $fails failed"


