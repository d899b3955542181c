#!/usr/bin/env bash
# The one GPU check script (run by the device tool from the repo root).
# Carry: .devdata (cifar10_25k.npz) and .whl/site (pure-python packages missing there), both
# made here by `bash bench/prepare_device.sh`.
# Everything lands in /tmp/res and is packed into $OUT/results.tgz after each stage, so a
# timeout still returns what finished (the device tool returns at most 8 files).
# STAGES picks stages (default "1 2 3 4"; 5 and 6 run only when named), so the checks can be
# split over calls;
# BATCHES (default "128 512") picks stage 1's batch sizes, ROWS128 (default all) its rows at 128.
# SMOKE=1 runs every stage on the CPU with tiny models and sizes (a few minutes), to check
# the script itself before it spends GPU time: SMOKE=1 OUT=/tmp/smoke bash bench/device_run.sh
set -u
STAGES=" ${STAGES:-1 2 3 4} "
want() { [[ "$STAGES" == *" $1 "* ]]; }
export PYTHONPATH=$PWD/.whl/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; R=/tmp/res; mkdir -p "$OUT" "$R"
pack() { tar -czf "$OUT/results.tgz" -C "$R" . ; echo "== packed after $1 ($(date +%T))"; }
SMOKE=${SMOKE:-0}
if [[ "$SMOKE" == 1 ]]; then
  R=/tmp/res-smoke; rm -rf "$R"; mkdir -p "$R"
  DEV=cpu DATA=dat/assets/cifar10_sample.npz
  TP="--model resnet_tiny --batch-size 4 --iters 1 --warmup 0 --eval-examples 8 --eval-batch-size 8 --aa-examples 2 --defaults cuda"
  GC="--model resnet_tiny --train-n 64 --epochs 1 --batch-size 32 --test-n 32 --skip-wrn"
  TR="model.name=resnet_tiny train.steps_per_epoch=2 train.val_examples=32 data.test_subset=64"
  EV="--n-examples 20 --attacks clean,pgd20,cw,aa"
  CA="--device cpu --model resnet_tiny --batch-size 8"
  FB="--device cpu --model resnet_tiny --examples 8 --batch-size 8 --reps 1"
  RB="model.name=resnet_tiny train.steps_per_epoch=2 train.val_examples=32 data.test_subset=64 data.batch_size=32"
  AAN=16
  COMPILE=${COMPILE-} COMPILE_ATTACKS=${COMPILE_ATTACKS-}
else
  DEV=cuda DATA=.devdata/cifar10_25k.npz TP="" GC="" TR="model.name=resnet18 train.val_examples=500 data.test_subset=2000"
  EV=${EV:-"--n-examples 1000 --attacks clean,pgd20,cw,aa"}  # stage 3's evaluate.py options
  CA="--device cuda --model resnet18 --batch-size 128"
  FB="--device cuda --model resnet18 --examples 5000 --batch-size 500 --reps 3"
  RB="model.name=resnet18 train.val_examples=500 data.test_subset=1000 data.batch_size=512"
  AAN=1000
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$R/gpu.txt"
fi
python -c "import torch; print(torch.__version__)" | tee -a "$R/gpu.txt"
# 1. throughput at batch 128 (every row) and 512 (DAT rows), each with a torch.compile row
#    per mode in COMPILE (the model) and in COMPILE_ATTACKS (each training-attack step as
#    one graph), and a row with both where the modes match (compiling takes minutes;
#    COMPILE= COMPILE_ATTACKS= skip them)
COMPILE=${COMPILE-reduce-overhead} COMPILE_ATTACKS=${COMPILE_ATTACKS-reduce-overhead}
BATCHES=" ${BATCHES:-128 512} "  # which batch sizes stage 1 runs (split them over calls)
if want 1 && [[ "$BATCHES" == *" 128 "* ]]; then
python bench/throughput.py --device $DEV --batch-size 128 --iters ${ITERS:-20} --rows "${ROWS128:-all}" --compile "$COMPILE" --compile-attacks "$COMPILE_ATTACKS" $TP --json "$R/throughput_b128.json" 2>&1 | tee "$R/throughput_b128.txt"
pack throughput128
fi
if want 1 && [[ "$BATCHES" == *" 512 "* ]]; then
python bench/throughput.py --device $DEV --batch-size 512 --iters ${ITERS512:-10} --rows "${ROWS512:-reference,fast_dat,plain}" --compile "$COMPILE" --compile-attacks "$COMPILE_ATTACKS" $TP --json "$R/throughput_b512.json" 2>&1 | tee "$R/throughput_b512.txt"
pack throughput512
fi
# 2. same-budget training reference vs fast, bf16 attack objective, WRN-34-10 memory
#    (GC_ARGS adds options, e.g. "--fast-precision fp32")
if want 2; then
python bench/gpu_check.py --data $DATA --out "$R" --epochs ${GC_EPOCHS:-2} --seeds ${GC_SEEDS:-1} $GC ${GC_ARGS:-} 2>&1 | tee "$R/gpu_check.txt"
pack gpu_check
fi
# 3. the real trainer on the GPU, then evaluate.py with AutoAttack on 1,000 test images
#    (TRAIN_PERF adds overrides, e.g. "perf.compile=reduce-overhead perf.compile_attacks=reduce-overhead")
if want 3; then
rm -rf /tmp/c10 /tmp/runs/gpu
python bench/unpack_npz.py $DATA /tmp/c10 >/dev/null
python train.py data.name=imagefolder data.root=/tmp/c10 train.epochs=${TRAIN_EPOCHS:-5} \
  optim.schedule=cosine data.batch_size=256 optim.lr=0.2 train.image_every=0 \
  train.out_dir=/tmp/runs train.run_name=gpu $TR ${TRAIN_PERF:-} 2>&1 | tr '\r' '\n' | grep -v '%|' | tee "$R/train.txt"
cp /tmp/runs/gpu/metrics.json "$R/train_metrics.json" 2>/dev/null
pack train
python evaluate.py --checkpoint /tmp/runs/gpu/checkpoints/best.pt $EV \
  --out "$R/eval" --no-progress 2>&1 | tee "$R/eval.txt"
pack eval
fi
# 4. compiled attacks: weight gradients skipped by frozen parameters (bench/compiled_attack.py),
#    and evaluation with BN folded (bench/fold_bn.py)
if want 4; then
python bench/compiled_attack.py $CA 2>&1 | grep -v '^W1' | tee "$R/compiled_attack.txt"
pack compiled_attack
# BN folded into the convolutions for evaluation (dat.evaluate's fold_bn; auto folds on CPU
# and CUDA)
for prec in fp32 bf16; do
python bench/fold_bn.py $FB --precision $prec 2>&1 | tee -a "$R/fold_bn.txt"
done
pack fold_bn
fi
# 5. (only when named) the AutoAttack target on a robust model: PGD-AT ResNet-18 for
#    AA_EPOCHS epochs on the carried 25k images (batch 512, cosine lr 0.2), then
#    evaluate.py with AutoAttack (standard, fp32) on 1,000 test images, timed in its report
if want 5; then
[[ -d /tmp/c10 ]] || python bench/unpack_npz.py $DATA /tmp/c10 >/dev/null
rm -rf /tmp/runs/robust
python train.py --config pgd_at_cifar10_resnet18 data.name=imagefolder data.root=/tmp/c10 \
  train.epochs=${AA_EPOCHS:-8} optim.schedule=cosine optim.lr=0.2 train.val_pgd_steps=10 \
  "train.test_attacks=[clean,pgd20]" train.image_every=0 train.out_dir=/tmp/runs \
  train.run_name=robust $RB 2>&1 | tr '\r' '\n' | grep -v '%|' | tee "$R/train_robust.txt"
cp /tmp/runs/robust/metrics.json "$R/train_robust_metrics.json" 2>/dev/null
pack train_robust
python evaluate.py --checkpoint /tmp/runs/robust/checkpoints/best.pt \
  --attacks clean,pgd20,cw,aa --n-examples $AAN --out "$R/eval_robust" --no-progress 2>&1 \
  | tee "$R/eval_robust.txt"
pack eval_robust
fi
# 6. (only when named) PGD-20 evaluation on 10,000 images: the eager rows and, per mode in
#    EVAL_COMPILE, fp32 and bf16 rows with the attacked forward compiled as
#    dat.evaluate(compile_mode=) does (the PGD-20 <= 3 s target); eval batch EVAL_BS
if want 6; then
python bench/throughput.py --device $DEV --rows pgd20_eval --eval-compile "${EVAL_COMPILE-default}" \
  --eval-batch-size ${EVAL_BS:-2500} $TP --json "$R/pgd20_eval.json" 2>&1 | grep -v '^W1' | tee "$R/pgd20_eval.txt"
pack pgd20_eval
fi
