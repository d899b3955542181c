"""How many operations ``perf.compile_attacks`` turns into one graph per attack step.

    python bench/attack_ops.py [--model resnet18] [--batch-size 4]

Counts, with CUDA's defaults (bf16 autocast, channels_last, the clean and recombined
images attacked as one 2B batch with split BN) on any device: the ATen operations (kernel
launches on a GPU) of one eager EAEG step, and of one whole fast DAT step (reversal). The
attacks' share of the step is what compiled attack steps can take out of the launch-bound
batch-128 step; the rest (the train-mode passes, the generator, the optimisers) is left.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from op_count import count_ops  # noqa: E402

import dat  # noqa: E402
from dat.attacks import _ascent_step, eval_mode  # noqa: E402
from dat.build import compile_model  # noqa: E402
from dat.generator import AmplitudeGenerator  # noqa: E402
from dat.methods.dat import DATStep  # noqa: E402
from dat.models.dual_bn import bn_branch  # noqa: E402


def cuda_config_step(model_name: str, batch_size: int, *, steps: int = 5,
                     foreach: bool = False, compile_mode: str = "off",
                     compile_attacks: str = "off"):
    """(model, DATStep, x, y) in CUDA's configuration on any device: bf16 autocast,
    channels_last, batched branches, reversal; ``foreach`` picks SGD's multi-tensor update
    (CUDA's default; a CPU's default loops per tensor)."""
    torch.manual_seed(0)
    cl = torch.channels_last
    model = dat.models.create(model_name, 10, dual_bn=True).to(memory_format=cl)
    gen = AmplitudeGenerator(10, (3, 32, 32))
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=foreach)
    step = DATStep(compile_model(model, compile_mode), gen,
                   torch.optim.SGD(model.parameters(), **sgd),
                   torch.optim.SGD(gen.parameters(), **sgd), batched=True, steps=steps,
                   generator_update="reversal", autocast_dtype=torch.bfloat16,
                   compile_attacks=compile_attacks)
    x = torch.rand(batch_size, 3, 32, 32).contiguous(memory_format=cl)
    return model, step, x, torch.randint(0, 10, (batch_size,))


def main(argv: list[str] | None = None) -> dict[str, int]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="attack steps (DAT: 5)")
    args = p.parse_args(argv)
    model, step, x, y = cuda_config_step(args.model, args.batch_size, steps=args.steps)
    xx, yy = torch.cat([x, x]), torch.cat([y, y])  # the batched attack's 2B images
    low, high = (xx - 8 / 255).clamp(min=0), (xx + 8 / 255).clamp(max=1)
    with torch.no_grad():
        target = model.eval()(xx)

    def attack_step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16), eval_mode(model), \
                bn_branch(model, "split"), torch.enable_grad():
            _ascent_step(model, xx, low, high, yy, target, 15.0, 0.5, "ce", 2 / 255)

    def dat_step():
        step.run(x, y)

    attack_step(), dat_step()  # warm-up: lazy state (momentum buffers)
    out = {"attack_step": count_ops(attack_step), "dat_step": count_ops(dat_step)}
    share = args.steps * out["attack_step"] / out["dat_step"]
    print(f"{args.model}, bf16, channels_last, batched 2x{args.batch_size}: one eager attack step "
          f"{out['attack_step']} operations; one fast DAT step (reversal) {out['dat_step']}; "
          f"its {args.steps} attack steps are {share:.0%} of them")
    return out


if __name__ == "__main__":
    main()
