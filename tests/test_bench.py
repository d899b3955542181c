"""bench/throughput.py runs on a CPU with a tiny model and reports ratios to the reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import throughput  # noqa: E402


def test_throughput_table_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    table = throughput.main(["--rows", "reference,fast_dat,plain", "--batch-size", "4",
                             "--iters", "1", "--warmup", "0", "--json", str(out),
                             "--compile", "no-such-mode", "--count-ops"])
    names = list(table)
    assert names[0].startswith("reference_dat")
    # every fast-path piece is flipped once on top of the device's defaults (CPU: fp32,
    # channels_last on, two B batches)
    assert "fast_dat reversal, bf16" in names
    assert "fast_dat reversal, no channels_last" in names
    assert "fast_dat reversal, batched branches" in names
    assert table[names[0]]["ratio_vs_reference"] == 1.0
    # a failing row is reported, and the others are still measured
    assert "no-such-mode" in table.pop("fast_dat reversal + compile(no-such-mode)")["error"]
    for row in table.values():
        assert row["img_per_s"] > 0 and row["ratio_vs_reference"] > 0
    # fewer operations than the published procedure: targets once, no generator recompute
    ops = {name: row["ops_per_iter"] for name, row in table.items()}
    assert ops["fast_dat reversal (all fast paths)"] < 0.8 * ops[names[0]]
    assert ops["fast_dat reversal (all fast paths)"] < ops["fast_dat alternating"]
    assert 0 < ops["plain_step (fwd+bwd+SGD)"] < ops["fast_dat alternating"]
    saved = json.loads(out.read_text())
    assert saved["meta"]["batch_size"] == 4 and set(saved["rows"]) >= set(table)
    assert "| reference_dat" in capsys.readouterr().out


def test_trainer_adds_few_operations_per_step():
    """The trainer's own per-step work (guard, stat sums, EMA) stays a few dozen
    operations, not one per tensor: on a GPU each is a kernel launch."""
    import trainer_ops

    counts = trainer_ops.main(["--model", "resnet_tiny"])
    assert counts["method_run"] > 500
    assert 0 < counts["trainer_overhead"] < 60, counts


def test_fold_bn_bench_folds_and_agrees():
    import fold_bn

    result = fold_bn.main(["--model", "resnet_tiny", "--examples", "8", "--batch-size", "8",
                           "--reps", "1"])
    assert result["bn_folded"] > 0 and result["max_logit_gap"] < 1e-5
    assert result["pgd20_outcomes_agree"] >= 7 and result["speedup"] > 0


def test_throughput_counts_the_gpu_configuration_on_a_cpu():
    """--defaults cuda starts the rows from CUDA's auto defaults (bf16, batched branches),
    so a CPU can count the GPU step's operations; fused split BN cuts them."""
    table = throughput.main(["--rows", "fast_dat reversal", "--batch-size", "2", "--iters", "1",
                             "--warmup", "0", "--count-ops", "--defaults", "cuda"])
    ops = {name: row["ops_per_iter"] for name, row in table.items()}
    assert "fast_dat reversal, no bf16" in ops and "fast_dat reversal, no batched branches" in ops
    assert ops["fast_dat reversal, fused split BN"] < ops["fast_dat reversal (all fast paths)"]


def test_graph_launches_fall_with_each_compile_flag():
    """Counted launches of the GPU configuration: compiled attack steps and the compiled
    model each remove launches, and together they remove the most."""
    import graph_launches

    out = graph_launches.main(["--model", "resnet_tiny", "--batch-size", "2"])
    launches = [row["launches"] for row in out.values()]  # off/off, attacks, model, both
    assert launches[0] > launches[1] > launches[3] and launches[0] > launches[2] > launches[3]
    assert launches[0] > 3 * launches[3]
    assert list(out.values())[0]["graph_calls"] == 0 < list(out.values())[3]["graph_calls"]


def test_attack_ops_counts_one_step_and_its_share():
    import attack_ops

    out = attack_ops.main(["--model", "resnet_tiny", "--batch-size", "2", "--steps", "2"])
    assert 0 < 2 * out["attack_step"] < out["dat_step"]
