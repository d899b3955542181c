"""Evaluate a robust model: ``python evaluate.py --checkpoint RUN/checkpoints/best.pt``.

    python evaluate.py --checkpoint RUN/checkpoints/best.pt      # a dat checkpoint
    python evaluate.py --model resnet18 --weights net.pt --data cifar10        # a dat.models name
    python evaluate.py --model timm/resnet18 --weights net.pt --normalize imagenet  # a timm one
    python evaluate.py --model nets.py:build --weights net.safetensors         # your builder

Thin wrapper around :func:`dat.evaluation.cli.evaluate_main`; ``--help`` lists the options.
"""

from dat.evaluation.cli import evaluate_main

if __name__ == "__main__":
    raise SystemExit(evaluate_main())
