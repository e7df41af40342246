#!/usr/bin/env bash
# Regenerate the results page's data (docs/results/): the bench_small sweep and its report, the
# step-cost table (mnist1d MLP and ResNet-20) and the loop overhead. Run on a quiet machine from
# the repository root, in the environment the README installs (with the peers extra):
#
#   bash launch/make_results.sh            # ≈ 35 min on 2 CPU cores (bench_small ≈ 29 min of it)
#
# It ends by rewriting docs/results.md (launch/results_page.py), keeping its hand-written notes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/results
sweep=outputs/bench_small/$(date +%Y-%m-%d_%H-%M-%S)
mkdir -p "$out"

start=$(date +%s)
python -m metaopt -m experiment=bench_small hydra.sweep.dir="$sweep"
echo "bench_small: $(( $(date +%s) - start )) s wall" | tee "$out/bench_small_wall.txt"
python -m metaopt.report "$sweep"
rm -rf "$out/bench_small"
cp -r "$sweep/report" "$out/bench_small"

# ResNet-20 steps cost ≈ 1 s each on one CPU thread: fewer, shorter rounds there.
python -m metaopt.bench steps --threads 1 --task mnist1d --steps 100 --rounds 7 \
    --markdown "$out/step_cost_mnist1d.md" --out "$out/step_cost_mnist1d.json"
python -m metaopt.bench steps --threads 2 --task resnet --steps 3 --rounds 3 \
    --markdown "$out/step_cost_resnet.md" --out "$out/step_cost_resnet.json"
python -m metaopt.bench loop --threads 1 --rounds 5 --out "$out/loop_overhead.json"
python launch/results_page.py "$out"
