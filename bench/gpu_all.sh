#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one pass, most important first, each bench under its own
# time limit so that one that hangs or fails leaves the others their turn. Logs go to $1 (default
# bench-results/), one file per bench. Sized for one H200 (the v2 reference train steps need
# ~137 GiB); lower the batches in bench/train_step.py's SETUPS on a smaller card.
#
#     bench/gpu_all.sh [results-dir [bench-name...]]
#
# On a lent machine: run bench/device_packages.sh here first, then the device call
# `bench/gpu_all.sh $OUT/r NAMES...` with `.whl` in its carry.
#
# With names, only those benches run: all of them take ~25 minutes, more than one device call (10
# minutes) and a session's device time (15 minutes, start-up included), so a session picks what its
# open issues need, in calls that fit, e.g. `train_step_b train_step_c`.
set -u
cd "$(dirname "$0")/.."
results=${1:-bench-results}
shift $(( $# > 0 ? 1 : 0 ))
selected=" $* "
known=" train_step_b train_step_c train_step_compiled_references train_step encode encode_hidden_states encode_two_actors encode_two_calls train_throughput profile_stage_b "
for name in $selected; do
    if [[ $known != *" $name "* ]]; then
        echo "unknown bench '$name': pick from$known" >&2
        exit 2
    fi
done
mkdir -p "$results"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python=${PYTHON:-python3}
# A lent machine starts bare, without Ray, MLflow or diffusers: bench/device_packages.sh packs them
# here, and the device call carries `.whl`.
if [[ -f .whl/site312.tar.xz ]]; then
    site=/tmp/device-site
    [[ -d $site/ray ]] || { mkdir -p "$site" && tar -xJf .whl/site312.tar.xz -C "$site"; } || exit 1
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$results/device.txt"
$python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)" | tee -a "$results/device.txt"

bench() {  # bench NAME SECONDS ARGS...
    local name=$1 seconds=$2
    shift 2
    if [[ $selected != "  " && $selected != *" $name "* ]]; then
        return
    fi
    echo "== $name: $*  ($(date -u +%FT%TZ))" | tee "$results/$name.log"
    timeout "$seconds" "$@" 2>&1 | tee -a "$results/$name.log"
    echo "== $name exit ${PIPESTATUS[0]} ($(date -u +%FT%TZ))" | tee -a "$results/$name.log"
}

# Dashboard-free local Ray: a minimal ray install has no dashboard, and these benches need none.
# Most important first. The three train-step benches make one device call (`bench/gpu_all.sh $OUT/r
# train_step_b train_step_c train_step_compiled_references`, under 10 minutes, predicted): each
# implementation builds its model once and measures its variants in turn, and the bench exits
# non-zero when ours leaves the reference in fp32.
# Stage B's goals, both at once: >= 1.5x the best reference's samples/s at <= 0.5x its peak memory.
# Compiled per block with a budget per level, the v2 Stage B kept 0.48x of the reference's memory on
# an H200 (2026-12-04) but ran between 0.88x and 1.38x, no faster than eager ours; the profile and
# the CUDA-graph variants say whether the host's launches are what the step waits on.
bench train_step_b 300 $python bench/train_step.py --device cuda --config v2 --steps 10 --stages b --profile \
    --reference shipped,cudagraph \
    --ours compile+budget=0.3/0.4/0.6/0.5+cudagraph,compile+budget=0.3/0.4/0.6/0.5,checkpointing+cudagraph,eager
# Stage C toward 3x the reference as shipped and >= 2x its best, at <= 0.5x the best's peak memory.
bench train_step_c 200 $python bench/train_step.py --device cuda --config v2 --steps 10 --stages c --profile \
    --reference shipped,sdpa,sdpa+cudagraph \
    --ours compile+cudagraph,checkpointing+cudagraph,compile+budget=0.5+cudagraph,eager
# The reference compiled per block (Stage B's already has fused attention), against eager ours of the same
# run: last, since compiling the references costs the most device time for the fewest new figures.
bench train_step_compiled_references 240 $python bench/train_step.py --device cuda --config v2 --steps 10 \
    --stages c,b --reference sdpa+compile --ours eager
bench train_step 240 $python bench/train_step.py --device cuda --config v2 --steps 10
bench encode 180 $python bench/encode.py --device cuda --shards 5 --shard-size 512 --no-dashboard
# As the v2 config runs the phase: both CLIP text towers in the actor too, randomly initialised at the
# v2 architecture (their weights come from the hub, which a lent machine cannot reach). Not timed yet.
bench encode_hidden_states 200 $python bench/encode.py --device cuda --shards 5 --shard-size 512 --text hidden_states \
    --no-dashboard
# Two actors on the one GPU: while one waits on its CPU work, the other's batches keep the GPU busy.
bench encode_two_actors 180 $python bench/encode.py --device cuda --shards 6 --shard-size 512 --actors 2 \
    --actor-cpus 7 --no-dashboard
# One actor on two shards at once: it reads and decodes its next shard while it writes and commits
# the last one, which a single call leaves the GPU idle for (docs/benchmarks.md).
bench encode_two_calls 180 $python bench/encode.py --device cuda --shards 6 --shard-size 512 --calls-per-actor 2 \
    --no-dashboard
# ~300 s on an H200: ~75 s for the bare loop, ~45 s for Ray and the worker's model, ~45 s of Ray Train
# steps, then the end of the run, which 50 s did not cover there (most likely its final checkpoint:
# the v2 Stage C model, EMA and AdamW state, 16 GB).
bench train_throughput 330 $python bench/train_throughput.py --device cuda --models v2 --batch 32 --steps 120 \
    --cpus 8 --batches-per-epoch 64 --no-dashboard
bench profile_stage_b 90 $python bench/profile_step.py --device cuda --stage b --impl ours --steps 2 --rows 30
