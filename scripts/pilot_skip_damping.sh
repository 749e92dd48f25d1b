#!/bin/bash
# Run from the repository root: bash scripts/pilot_skip_damping.sh (about 6 minutes on 2 cores). docs/study.md has its table.
# Pilot for the skip study's fixed K-FAC damping (paper silent): plain 6-layer linear MLP, no clip, 10 epochs.
export OMP_NUM_THREADS=1
for b in 256 8192; do for d in 0.01 0.03 0.1 0.3; do for lr in 0.003 0.03 0.3; do
  out=${PILOT_DIR:-runs/pilot-skip-damping}/b$b-d$d-lr$lr; rm -rf $out
  r=$(.venv/bin/python -m jobs.train --config jobs/configs/mnist_linear_mlp.toml 'optim.name="kfac"' data.batch_size=$b run.epochs=10 run.out_dir=$out run.train_eval_examples=0 run.progress=false kfac.kl_clip=0 kfac.damping=$d optim.lr=$lr optim.momentum=0.9 2>&1 | tail -1)
  echo "b=$b damping=$d lr=$lr: $r"
done; done; done
