"""Evaluate a robust model: ``python evaluate.py --checkpoint RUN/checkpoints/best.pt``.

Thin wrapper around :func:`dat.evaluation.cli.evaluate_main`; ``--help`` lists the options.
"""

from dat.evaluation.cli import evaluate_main

if __name__ == "__main__":
    raise SystemExit(evaluate_main())
