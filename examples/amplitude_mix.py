"""AmplitudeMix alone: ordinary (non-adversarial) training with amplitude mix-up batches.

Each image keeps its phase and takes ``lam * A(other) + (1 - lam) * A(x)`` as amplitude
(``lam ~ U(0, mu)``), labels unchanged; used like torchvision's MixUp, after the loader.

    python examples/amplitude_mix.py --steps 300
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import dat
from dat.config import DataConfig
from dat.data import load_dataset, make_loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mu", type=float, default=1.0, help="lam ~ U(0, mu)")
    parser.add_argument("--model", default="resnet_small", help="see dat.models.list_models()")
    args = parser.parse_args()
    torch.manual_seed(0)

    cfg = DataConfig(name="cifar10-sample", batch_size=args.batch_size)
    splits = load_dataset(cfg)
    loader = make_loader(splits.train, cfg, "cpu", train=True)  # crop + flip on batches
    model = dat.models.create(args.model, num_classes=splits.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    mix = dat.AmplitudeMix(mu=args.mu)

    step, epoch = 0, 0
    while step < args.steps:
        loader.set_epoch(epoch)
        for batch in loader:
            x_mixed, y = mix(batch.x, batch.y)  # phase (semantics) kept, labels unchanged
            x, y = torch.cat([batch.x, x_mixed]), torch.cat([y, y])  # clean + mixed copies
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 50 == 0 or step == args.steps - 1:
                print(f"step {step:4d}  loss {loss.item():.3f}")
            step += 1
            if step == args.steps:
                break
        epoch += 1

    x_test, y_test = splits.test.tensors()
    model.eval()
    with torch.no_grad():
        clean = (model(x_test).argmax(1) == y_test).float().mean().item()
        mixed = (model(mix(x_test)).argmax(1) == y_test).float().mean().item()
    print(f"test accuracy: clean {100 * clean:.1f} %, amplitude-mixed {100 * mixed:.1f} % "
          f"on {len(y_test)} images")


if __name__ == "__main__":
    main()
