"""Compiled training attacks (``compile_mode`` / ``perf.compile_attacks``): each attack step
is one graph, the results equal the eager attack's, and every entry point reaches it."""

from __future__ import annotations

import pytest
import torch
from test_dat_step import _players  # the DAT players (model, generator, optimisers)
from torch._dynamo.testing import CompileCounterWithBackend

import dat.attacks as attacks
from dat.attacks import compiled_step, eaeg, pgd, trades_kl
from dat.config import ConfigError, load_config
from dat.methods.dat import DATDraws, DATStep
from dat.methods.pgd_at import PGDATStep
from dat.trainer import Trainer

EPS, ALPHA = 8 / 255, 2 / 255
TINY = [
    "data.name=cifar10-sample", "model.name=resnet_tiny", "data.batch_size=16",
    "data.eval_batch_size=64", "data.test_subset=40", "train.epochs=1",
    "train.steps_per_epoch=2", "train.val_examples=40", "train.val_pgd_steps=2",
    "method.attack.steps=2", "perf.log_every=2", "train.test_attacks=[clean]",
]

ATTACKS = {
    "pgd": lambda m, x, y, **kw: pgd(m, x, y, EPS, ALPHA, steps=3, **kw),
    "pgd_cw": lambda m, x, y, **kw: pgd(m, x, y, EPS, ALPHA, steps=3, loss="cw", **kw),
    "pgd_smoothed": lambda m, x, y, **kw: pgd(m, x, y, EPS, ALPHA, steps=3,
                                              label_smoothing=0.5, **kw),
    "trades_kl": lambda m, x, y, **kw: trades_kl(m, x, EPS, ALPHA, steps=3, **kw),
    "eaeg": lambda m, x, y, **kw: eaeg(m, x, y, EPS, ALPHA, steps=3, beta=15.0,
                                       label_smoothing=0.5, **kw),
}


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile through aot_eager (the eager ATen ops, no code generation on the test
    CPU) with a graph counter; records what dat asked torch.compile for."""
    real_compile, asked = torch.compile, []
    counter = CompileCounterWithBackend("aot_eager")
    counter.outputs = []  # what the compiled function returned, last call last

    def fake_compile(fn, mode=None, dynamic=None, fullgraph=False, **kw):
        asked.append({"mode": mode, "dynamic": dynamic, "fullgraph": fullgraph})
        compiled = real_compile(fn, backend=counter, dynamic=dynamic, fullgraph=fullgraph)
        if isinstance(fn, torch.nn.Module):
            return compiled

        def recorded(*args):
            counter.outputs.append(compiled(*args))
            return counter.outputs[-1]

        return recorded

    monkeypatch.setattr(torch, "compile", fake_compile)
    compiled_step.cache_clear()
    torch._dynamo.reset()
    yield counter, asked
    compiled_step.cache_clear()
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(ATTACKS))
def test_compiled_attack_equals_eager_with_one_graph(name, aot_eager, make_warm_model,
                                                     sample_batch) -> None:
    counter, asked = aot_eager
    x, y = sample_batch
    model = make_warm_model(dual_bn=True).train()
    params = [p for p in model.parameters()]
    torch.manual_seed(1)
    eager = ATTACKS[name](model, x, y, branch="aux")
    for _ in range(2):  # the second attack replays the graph: no recompilation
        torch.manual_seed(1)
        compiled = ATTACKS[name](model, x, y, branch="aux", compile_mode="default")
        assert torch.equal(compiled, eager)
    assert counter.frame_count == 1  # one graph for all 3 steps of both attacks
    assert asked == [{"mode": None, "dynamic": False, "fullgraph": True}]
    # state restored: train mode, main branch, trainable parameters without gradients
    assert model.training and all(m.branch == "main" for m in model.modules()
                                  if hasattr(m, "branch"))
    assert all(p.requires_grad and p.grad is None for p in params)


def test_compiled_attack_unwraps_a_compiled_model(aot_eager, make_warm_model,
                                                  sample_batch) -> None:
    """With perf.compile too, the attack graph traces the plain module, not a nested
    compiled one."""
    counter, _ = aot_eager
    x, y = sample_batch
    model = make_warm_model()
    net = torch.compile(model)  # the fixture's counter backend
    eager = pgd(model, x, y, EPS, ALPHA, steps=2, random_start=False)
    assert torch.equal(pgd(net, x, y, EPS, ALPHA, steps=2, random_start=False,
                           compile_mode="default"), eager)
    assert counter.frame_count == 1


def test_inductor_compiled_attack_matches_eager(make_tiny_model, sample_batch) -> None:
    """The real compiler (C++ code on the CPU): same eps-ball, and it moves almost every
    pixel as eager does (fused float reductions may flip the sign of a tiny gradient)."""
    compiled_step.cache_clear()
    torch._dynamo.reset()
    x, y = sample_batch[0][:4], sample_batch[1][:4]
    model = make_tiny_model().eval()
    try:
        compiled = pgd(model, x, y, EPS, ALPHA, steps=2, random_start=False,
                       compile_mode="default")
    finally:
        compiled_step.cache_clear()
        torch._dynamo.reset()
    eager = pgd(model, x, y, EPS, ALPHA, steps=2, random_start=False)
    assert (compiled - x).abs().max() <= EPS + 1e-6 and 0 <= compiled.min() <= compiled.max() <= 1
    assert (compiled != eager).float().mean() < 0.02


def test_reduce_overhead_returns_a_copy(aot_eager, make_warm_model, sample_batch) -> None:
    """A CUDA graph overwrites its output at the next replay, so reduce-overhead hands
    back a copy of each step's output; the other modes hand back the output itself."""
    counter, asked = aot_eager
    x, y = sample_batch
    model = make_warm_model().eval()
    box = ((x - EPS).clamp(min=0), (x + EPS).clamp(max=1))
    args = (model, x, *box, y, None, 1.0, 0.0, "ce", ALPHA)
    with attacks.frozen_parameters(model), torch.enable_grad():
        eager = attacks._ascent_step(*args)
        for mode, copied in (("reduce-overhead", True), ("default", False)):
            out = compiled_step(mode)(*args)
            assert torch.equal(out, eager)
            assert (out.data_ptr() != counter.outputs[-1].data_ptr()) == copied, mode
    assert [a["mode"] for a in asked] == ["reduce-overhead", None]


@pytest.mark.parametrize("batched", [True, False])
def test_dat_step_with_compiled_attacks_equals_eager(batched, aot_eager, sample_batch) -> None:
    """Two full DAT steps (batched split-BN attack, or two attacks on two branches) give
    the same losses and weights with and without compiled attacks."""
    counter, _ = aot_eager
    x, y = sample_batch
    runs = {}
    for mode in ("off", "default"):
        model, gen, opt, gopt = _players()
        step = DATStep(model, gen, opt, gopt, batched=batched, fused_split_bn=True,
                       steps=2, compile_attacks=mode)
        losses = [step.run(x, y, draws=DATDraws.sample(
            len(x), (3, 32, 32), generator=torch.Generator().manual_seed(i)))["loss"]
            for i in range(2)]
        runs[mode] = (losses, model.state_dict(), gen.state_dict())
    for a, b in zip(runs["off"][0], runs["default"][0], strict=True):
        assert torch.equal(a, b)
    for i in (1, 2):
        for k, v in runs["off"][i].items():
            assert torch.equal(v, runs["default"][i][k]), k
    assert counter.frame_count == (1 if batched else 2)  # split; or main and aux


def test_baseline_steps_pass_the_mode_on(aot_eager, make_tiny_model, sample_batch) -> None:
    counter, asked = aot_eager
    x, y = sample_batch
    model = make_tiny_model()
    step = PGDATStep(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2,
                     compile_attacks="max-autotune")
    assert torch.isfinite(step.run(x, y)["loss"])
    assert asked[0]["mode"] == "max-autotune" and counter.frame_count == 1


@pytest.mark.parametrize("model_mode", ["off", "reduce-overhead"])
def test_trainer_trains_with_compiled_attacks(model_mode, aot_eager, tmp_path) -> None:
    """perf.compile_attacks alone, and with the model compiled too (perf.compile)."""
    _, asked = aot_eager
    cfg = load_config(None, [*TINY, "method.name=dat", "perf.compile_attacks=reduce-overhead",
                             f"perf.compile={model_mode}", f"train.out_dir={tmp_path}",
                             "train.run_name=ca"])
    trainer = Trainer(cfg, progress=False)
    assert trainer.method.compile_attacks == "reduce-overhead"
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.fit()
    assert metrics["steps"] == 2 and metrics["bad_steps"] == 0
    assert [a["mode"] for a in asked] == ["reduce-overhead"] * (1 + (model_mode != "off"))
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained


def test_config_checks_the_attack_compile_mode(monkeypatch) -> None:
    assert load_config(None, ["perf.compile_attacks=false"]).perf.compile_attacks == "off"
    with pytest.raises(ConfigError, match="perf.compile_attacks.*reduce-overhead"):
        load_config(None, ["perf.compile_attacks=fast"])
    monkeypatch.setattr(attacks, "_compiler_supported", lambda: False)
    with pytest.raises(ConfigError, match=r"torch >= 2\.11.*off") as err:
        load_config(None, ["perf.compile_attacks=default"])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"torch >= 2\.11"):
        DATStep(*_players()[:1], None, None, amplitude_source="random_image",
                compile_attacks="default")


class _DataDependent(torch.nn.Module):
    """A model whose forward branches on a value: no single graph can hold it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        out = self.linear(x.flatten(1))
        return out * 2 if out.sum().item() > 0 else out


def test_a_model_that_does_not_compile_gets_a_one_line_error(aot_eager, sample_batch) -> None:
    x, y = sample_batch
    with pytest.raises(ConfigError, match="_DataDependent does not compile as one graph.*"
                       "perf.compile_attacks=off") as err:
        pgd(_DataDependent(), x, y, EPS, ALPHA, steps=2, compile_mode="default")
    assert "\n" not in str(err.value)
