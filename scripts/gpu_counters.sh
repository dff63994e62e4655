#!/usr/bin/env bash
# New BBBC005 counters trained from scratch at once on a lent GPU (the ninth round's job,
# docs/experiments.md). Run from the repository root on the GPU machine, e.g. through the
# device tool: `OUT=$OUT bash scripts/gpu_counters.sh` (timeout_s 600).
#
#   SEEDS    counters to train, one process each (default "13 14")
#   SCENES   simulated training scenes, simulated once and shared (default 16000)
#   EPOCHS   epochs asked for (default 55, the shipped counter's)
#   BUDGET   seconds each run's epochs may take; fewer epochs, annealed, if they would not
#            fit (default 360: with ~115 s of simulation and ~30 s of loading, a
#            600-second call keeps a margin)
#   LIMIT    seconds the whole call may take (default 580): a slower simulation than
#            expected shrinks the budget so that the runs still end, and save, in time
#
# Each run's model.safetensors and config.json (uncalibrated: the real images are not
# there) land in $OUT/s<seed>/; finalize each here with the options the run recorded
# (its config.json's training.command; the script refuses others) plus
# `--weights $FILES/s<seed>/model.safetensors`. Exit status 1 if no run came back.
# Logs are line-buffered into $OUT/log.txt (`sed -u`: a plain sed held them back
# until it exited, and a run killed at the time limit showed nothing).
set -u
export PYTHONPATH=$PWD/src:$PWD/scripts PYTHONUNBUFFERED=1 CELLTALLY_AMP=0
SEEDS=${SEEDS:-13 14}
SCENES=${SCENES:-16000}
EPOCHS=${EPOCHS:-55}
BUDGET=${BUDGET:-360}
LIMIT=${LIMIT:-580}
OUT=${OUT:?set OUT to the folder that comes back}
mkdir -p "$OUT"
{ nvidia-smi -L; python3 -c 'import torch; print(torch.__version__, torch.cuda.is_available())'; date; } >>"$OUT/log.txt" 2>&1
ARGS="--init bbbc005 --scenes $SCENES --sim-seed 7000 --epochs $EPOCHS --lr 0.003 --batch-size 32
      --new-counter --planes-at input --sim-cache /tmp/simc --workers $(nproc)"
python3 scripts/continue_bbbc005.py $ARGS --simulate-only --out /tmp/simulated 2>&1 \
    | sed -u 's/^/[sim] /' >>"$OUT/log.txt"
date >>"$OUT/log.txt"
runs=$(echo $SEEDS | wc -w)
[ "$runs" -gt 0 ] || { echo "SEEDS names no seed" >>"$OUT/log.txt"; exit 1; }
threads=$(( $(nproc) / runs ))
# about 60 s of loading, mask prediction and saving follow the epochs
budget=$(( LIMIT - SECONDS - 60 < BUDGET ? LIMIT - SECONDS - 60 : BUDGET ))
if [ "$budget" -lt 1 ]; then
    echo "no time left to train (${SECONDS} s spent of ${LIMIT})" >>"$OUT/log.txt"; exit 1
fi
echo "budget ${budget} s per run (${SECONDS} s spent)" >>"$OUT/log.txt"
for seed in $SEEDS; do
    rm -rf "/tmp/run$seed"  # a warm machine's earlier call must not be copied as this one's
    (
        OMP_NUM_THREADS=$threads python3 scripts/continue_bbbc005.py $ARGS --seed "$seed" \
            --budget "$budget" --out "/tmp/run$seed" 2>&1 | sed -u "s/^/[s$seed] /" >>"$OUT/log.txt"
        mkdir -p "$OUT/s$seed"
        cp "/tmp/run$seed/model.safetensors" "/tmp/run$seed/config.json" "$OUT/s$seed/" \
            >>"$OUT/log.txt" 2>&1 && echo "[s$seed] copied $(date)" >>"$OUT/log.txt"
    ) &
done
wait
date >>"$OUT/log.txt"
ls "$OUT"/s*/model.safetensors >/dev/null 2>&1 || { echo "no run came back" >>"$OUT/log.txt"; exit 1; }
