"""PGD-20 evaluation with and without BatchNorm folded into the convolutions.

    python bench/fold_bn.py [--device cpu|cuda] [--model resnet18] [--examples 100]
                            [--batch-size 100] [--reps 3] [--precision fp32|bf16]

Runs the evaluation suite's PGD-20 through dat.evaluate's forward wrapper (channels_last
as dat.evaluate's default for the device) on the model and on its folded copy
(``dat.models.folding.fold_batchnorm``), alternating the two ``--reps`` times after one
warm-up each. Prints the median seconds, the speed-up, the folded logits' relative gap
and how many PGD-20 outcomes agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dat
from dat.evaluation.prepare import FastForward
from dat.evaluation.suite import make_attack
from dat.models.folding import fold_batchnorm, max_logit_gap


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = dat.models.create(args.model, num_classes=10).to(device)
    with torch.no_grad():  # running statistics away from their (0, 1) start
        model.train()(torch.rand(64, 3, 32, 32, device=device))
    model.eval()
    folded, n_folded = fold_batchnorm(model)
    x = torch.rand(args.examples, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.examples,), device=device)
    channels_last, bf16 = device.type in ("cpu", "cuda"), args.precision == "bf16"
    nets = {"unfolded": FastForward(model, bf16, channels_last).eval(),
            "folded": FastForward(folded, bf16, channels_last).eval()}
    attack = make_attack("pgd20", 8 / 255)

    def run(net) -> torch.Tensor:
        torch.manual_seed(1)
        out = [attack.fn(net, xb, yb) for xb, yb in
               zip(x.split(args.batch_size), y.split(args.batch_size), strict=True)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return torch.cat(out)

    for net in nets.values():
        run(net)
    times: dict[str, list[float]] = {k: [] for k in nets}
    for _ in range(args.reps):
        for name, net in nets.items():
            start = time.perf_counter()
            run(net)
            times[name].append(time.perf_counter() - start)
    adversarial = {k: run(net) for k, net in nets.items()}  # attacks need grad mode
    with torch.no_grad():
        robust = {k: net(adversarial[k]).argmax(1) == y for k, net in nets.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": args.model, "device": str(device), "examples": args.examples,
              "precision": args.precision, "channels_last": channels_last,
              "bn_folded": n_folded, "seconds": {k: round(v, 3) for k, v in med.items()},
              "all_seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
              "speedup": round(med["unfolded"] / med["folded"], 3),
              "max_logit_gap": max_logit_gap(model, folded, x[:64]),
              "pgd20_outcomes_agree": int((robust["folded"] == robust["unfolded"]).sum())}
    print(result)
    return result


if __name__ == "__main__":
    main()
