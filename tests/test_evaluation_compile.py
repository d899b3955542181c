"""``dat.evaluate(compile_mode=...)`` / ``evaluate.py --compile``: the attacked forward
under torch.compile gives the evaluation's numbers, compiles a bounded number of graphs,
and refuses what it cannot run in one line."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from dat.config import Config, config_to_dict
from dat.evaluation import EvaluationError, evaluate, format_markdown
from dat.evaluation.cli import evaluate_main

ATTACKS = ["clean", "fgsm", "pgd3", "cw"]


@pytest.fixture
def counted_compile(monkeypatch) -> Iterator[tuple[CompileCounterWithBackend, list]]:
    """torch.compile with dynamo's eager backend and a frame counter: the evaluation's own
    graph handling (guards, recompiles, hooks) without inductor's minutes on a CPU."""
    counter, modes, real = CompileCounterWithBackend("eager"), [], torch.compile

    def compile_counted(model, mode=None, **kwargs):
        modes.append(mode)
        return real(model, backend=counter, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_counted)
    torch._dynamo.reset()
    yield counter, modes
    torch._dynamo.reset()


def test_compiled_evaluation_matches_eager_and_compiles_few_graphs(
        make_warm_model, sample_batch, counted_compile) -> None:
    """Batches of 6, 6 and 4, then only the still-correct points: the batch dimension turns
    dynamic once instead of compiling a graph per size. The eval-mode monitor's hooks stay
    outside the compiled code: inside (on the folded copy, which inherited them from the
    model) they made it recompile at every call, up to torch's limit."""
    counter, modes = counted_compile
    model = make_warm_model().eval()
    kwargs = dict(attacks=ATTACKS, batch_size=6, progress=False, check_examples=8,
                  sweep=[0, 8 / 255])
    eager = evaluate(model, sample_batch, **kwargs)
    compiled = evaluate(model, sample_batch, compile_mode="default", **kwargs)
    assert modes == [None]  # "default" is torch.compile's own default mode
    assert compiled["results"] == eager["results"]
    assert compiled["sweep"] == eager["sweep"]
    assert compiled["compile"] == "default" and eager["compile"] == "off"
    assert compiled["fold_bn"]["folded"] > 0  # the folded copy is what was compiled
    assert compiled["checks"]["eval_mode"]["status"] == "pass", compiled["checks"]["eval_mode"]
    assert compiled["checks_status"] == eager["checks_status"]
    # grad on / off, each static then dynamic in the batch size; 8 is torch's limit
    assert 0 < counter.frame_count <= 6, counter.frame_count
    assert all(p.requires_grad for p in model.parameters())  # frozen only meanwhile
    assert "compiled (default)" in format_markdown(compiled)


def test_compiled_evaluation_with_inductor_matches_eager(make_warm_model, sample_batch) -> None:
    """The real compiler, on the smallest run that still attacks: equal numbers."""
    x, y = sample_batch[0][:8], sample_batch[1][:8]
    model = make_warm_model().eval()
    kwargs = dict(attacks=["clean", "pgd2"], batch_size=8, progress=False, checks=False)
    torch._dynamo.reset()
    try:
        compiled = evaluate(model, (x, y), compile_mode="default", **kwargs)
    finally:
        torch._dynamo.reset()
    assert compiled["results"] == evaluate(model, (x, y), **kwargs)["results"]


@pytest.mark.parametrize(("mode", "words"), [
    ("reduce-overhead", "CUDA graphs"),
    ("max-autotune", "max-autotune-no-cudagraphs"),
    ("fast", "off, default, max-autotune-no-cudagraphs"),
])
def test_modes_the_evaluation_does_not_run_are_refused(make_tiny_model, sample_batch, mode,
                                                       words) -> None:
    with pytest.raises(EvaluationError, match=words) as err:
        evaluate(make_tiny_model(), sample_batch, compile_mode=mode, progress=False)
    assert "\n" not in str(err.value)


def test_an_already_compiled_model_is_not_compiled_again(make_tiny_model,
                                                         sample_batch) -> None:
    torch._dynamo.reset()
    try:
        net = torch.compile(make_tiny_model().eval(), backend="eager")
        with pytest.raises(EvaluationError, match="already compiled.*compile_mode='off'"):
            evaluate(net, sample_batch, compile_mode="default", progress=False)
    finally:
        torch._dynamo.reset()


def test_a_model_that_does_not_compile_fails_in_one_line(make_tiny_model, sample_batch,
                                                         monkeypatch) -> None:
    from torch._dynamo.exc import BackendCompilerFailed

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    real = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda model, mode=None, **kw: real(model, backend=broken_backend, **kw))
    torch._dynamo.reset()
    try:
        with pytest.raises(EvaluationError, match="does not compile.*--compile off") as err:
            evaluate(make_tiny_model().eval(), sample_batch, compile_mode="default",
                     attacks=["clean"], progress=False, checks=False)
    finally:
        torch._dynamo.reset()
    assert isinstance(err.value.__cause__, BackendCompilerFailed)
    assert "\n" not in str(err.value)


def test_cli_compiles_and_keeps_resume_apart(make_warm_model, tmp_path, capsys,
                                             counted_compile) -> None:
    """``--compile`` reaches the evaluation and its report; an eager run's saved attacks are
    not reused by a compiled one (``--resume`` refuses the other evaluation's file)."""
    cfg = Config()
    cfg.model.name, cfg.data.name = "resnet_tiny", "cifar10-sample"
    torch.save({"model": make_warm_model().state_dict(), "config": config_to_dict(cfg),
                "epoch": 1}, tmp_path / "best.pt")
    args = ["--checkpoint", str(tmp_path / "best.pt"), "--attacks", "clean,fgsm",
            "--n-examples", "16", "--out", str(tmp_path / "eval"), "--no-progress",
            "--no-checks"]
    assert evaluate_main(args) == 0
    capsys.readouterr()
    assert evaluate_main(args + ["--compile", "default", "--resume"]) == 2
    assert "holds an evaluation with other compile mode" in capsys.readouterr().err
    assert evaluate_main(args + ["--compile", "default"]) == 0
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["compile"] == "default" and saved["reused"] == []
    assert counted_compile[0].frame_count > 0
