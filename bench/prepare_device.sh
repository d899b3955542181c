#!/usr/bin/env bash
# Builds the two ignored folders that bench/device_run.sh needs on a lent GPU machine. Run it
# once, here, in the repo root:
#   bash bench/prepare_device.sh [CIFAR10_JPEG_TREE]     (default ../shared/data/cifar10-jpg)
# - .devdata/cifar10_25k.npz: 25,000 training and 10,000 test images, the JPEG bytes as
#   they are (scripts/make_sample.py);
# - .whl/site: the pure-Python packages the GPU machine lacks (torchattacks, pyautoattack,
#   omegaconf, antlr4 and robustbench), copied from this machine's site-packages.
# Then name both in the device call's carry: [".devdata", ".whl"]. Together with the
# tracked files they must stay under the 64 MiB the device tool carries.
set -euo pipefail
SRC=${1:-../shared/data/cifar10-jpg}
[ -d "$SRC/train" ] || { echo "error: $SRC has no train/ folder; pass the CIFAR-10 JPEG tree"; exit 2; }
mkdir -p .devdata .whl/site
if [ ! -f .devdata/cifar10_25k.npz ]; then
  python scripts/make_sample.py --source "$SRC" --out .devdata/cifar10_25k.npz \
    --train-per-class 2500 --test-per-class 1000
fi
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for pkg in torchattacks pyautoattack omegaconf antlr4 robustbench; do
  if [ ! -d "$site/$pkg" ]; then echo "error: $pkg is not installed here; pip install -e '.[test]'"; exit 2; fi
  rm -rf ".whl/site/$pkg"
  cp -r "$site/$pkg" .whl/site/
  rm -rf ".whl/site/$pkg/examples"
  find ".whl/site/$pkg" -name __pycache__ -type d -prune -exec rm -rf {} +
done
du -sh .devdata .whl
total=$(( $(du -sb .devdata .whl | awk '{s+=$1} END {print s}') + $(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1) ))
echo "carried with the tracked files: $((total / 1048576)) MiB of 64"
[ "$total" -lt $((64 * 1048576)) ] || { echo "error: over the device tool's 64 MiB; use fewer images per class"; exit 1; }
