"""Add DAT to an existing plain PyTorch training loop around a timm model.

Every line that DAT adds is marked ``# DAT``; run with ``--plain`` for the original loop.

    python examples/dat_in_your_loop.py --steps 200          # DAT, on the CIFAR-10 sample
    python examples/dat_in_your_loop.py --steps 200 --plain  # the loop before DAT
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch import nn

import dat  # DAT
from dat.config import DataConfig
from dat.data import load_dataset


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random crop (padding 4) and horizontal flip, per batch (the loop's own augmentation)."""
    shift = torch.randint(-4, 5, (2,)).tolist()
    x = torch.roll(F.pad(x, (4, 4, 4, 4)), shifts=shift, dims=(-2, -1))[..., 4:-4, 4:-4]
    return x.flip(-1) if torch.rand(()) < 0.5 else x


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: bool) -> float:
    """Clean or PGD-10 (eps 8/255) accuracy in percent, model in eval mode."""
    model.eval()
    if attack:
        x = dat.attacks.pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=10)
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="resnet10t", help="any timm model name")
    parser.add_argument("--attack-steps", type=int, default=5)  # DAT: EAEG K (paper: 5)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--plain", action="store_true", help="run the loop without DAT")
    args = parser.parse_args()
    torch.manual_seed(0)

    splits = load_dataset(DataConfig(name="cifar10-sample"))
    x_train, y_train = splits.train.tensors()  # float images in [0, 1]
    x_test, y_test = splits.test.tensors()
    net = timm.create_model(args.model, pretrained=False, num_classes=10)
    model = nn.Sequential(T.Normalize((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)), net)
    if not args.plain:  # DAT
        model = dat.models.convert_dual_bn(model)  # DAT: 2nd BN set, before the optimizer
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)

    if not args.plain:  # DAT
        generator = dat.AmplitudeGenerator(num_classes=10, image_shape=(3, 32, 32))  # DAT
        dat_step = dat.DATStep(model, generator, optimizer, steps=args.attack_steps,  # DAT
                               label_smoothing=0.0)  # DAT: 0.5 in the published code

    for step in range(args.steps):
        model.train()
        idx = torch.randint(0, len(x_train), (args.batch_size,))
        x, y = x_train[idx], y_train[idx]
        x_aug = augment(x)
        if args.plain:  # DAT: keeps the original step runnable with --plain
            loss = F.cross_entropy(model(x_aug), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            stats = {"loss": loss.item()}
        else:  # DAT: attacks, recombination, both updates in one call
            stats = dat_step(x_aug, y, x_raw=x)  # DAT: x_raw = the un-augmented batch
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  " + "  ".join(f"{k} {v:.3f}" for k, v in stats.items()
                                                 if k in ("loss", "acc_clean", "acc_adv")))

    if not args.plain:  # DAT
        model = dat.models.export_main_branch(model)  # DAT: a plain single-BN model again
    idx = torch.linspace(0, len(x_test) - 1, min(args.eval_size, len(x_test))).long()
    x_eval, y_eval = x_test[idx], y_test[idx]  # spread over the class-sorted test set
    print(f"test accuracy: clean {accuracy(model, x_eval, y_eval, False):.1f} %, "
          f"PGD-10 {accuracy(model, x_eval, y_eval, True):.1f} % on {len(y_eval)} images")


if __name__ == "__main__":
    main()
