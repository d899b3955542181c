"""How often torch.compile compiles in dat's compiled paths: a count of graphs, not a timing.

Each graph of a ResNet-18 costs tens of seconds to compile on a GPU, so a graph that runs
once (an epoch's last, smaller batch; a one-image probe) or that only differs from another
in a flag that changes nothing (grad mode of a forward whose output is detached, trainable
parameters during an attack) wastes part of the speed-up. BENCHMARKS.md, "Compile counts".
The graphs go through aot_eager (no code generation on the test CPU).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.backends.registry import lookup_backend

import dat
from dat.config import load_config
from dat.trainer import Trainer


class _Recorder(list):
    """A torch.compile backend (aot_eager underneath) that records, per graph it gets:
    the batch size of its image input, the grad mode and the count of frozen parameters."""

    def __call__(self, gm, example_inputs):
        images = [t for t in example_inputs if isinstance(t, torch.Tensor)
                  and not isinstance(t, nn.Parameter) and t.dim() == 4]
        frozen = sum(isinstance(t, nn.Parameter) and not t.requires_grad for t in example_inputs)
        batch = max(images, key=torch.Tensor.numel).shape[0] if images else None
        self.append({"batch": batch, "grad": torch.is_grad_enabled(), "frozen": frozen})
        return lookup_backend("aot_eager")(gm, example_inputs)


@pytest.fixture
def recorder(monkeypatch):
    """torch.compile with the recorder as its backend, on a fresh dynamo cache."""
    real_compile, graphs = torch.compile, _Recorder()

    def recorded_compile(fn, mode=None, dynamic=None, fullgraph=False, **kw):
        return real_compile(fn, backend=graphs, dynamic=dynamic, fullgraph=fullgraph)

    monkeypatch.setattr(torch, "compile", recorded_compile)
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()


def _compiled_trades(tmp_path) -> Trainer:
    """TRADES with the model compiled, on 10 images in batches of 4, 4, 2."""
    return Trainer(load_config(None, [
        "data.name=cifar10-sample", "model.name=resnet_tiny", "data.batch_size=4",
        "data.train_subset=10", "data.test_subset=8", "train.epochs=1", "train.val_every=0",
        "method.name=trades", "method.attack.steps=1", "train.test_attacks=[clean]",
        "perf.compile=default", f"train.out_dir={tmp_path}", "train.run_name=counted"]),
        progress=False)


def test_training_compiles_each_graph_once(recorder, tmp_path) -> None:
    """Batches of 4, 4, 2: the attack's graph (its KL target runs through it too) and the
    loss's graph, once each. The last batch of 2 runs eagerly instead of compiling both
    again, and the target no inference graph of its own."""
    metrics = _compiled_trades(tmp_path).fit()
    assert metrics["steps"] == 3 and metrics["bad_steps"] == 0
    assert [(g["batch"], g["grad"]) for g in recorder] == [(4, True), (4, True)], recorder
    assert recorder[0]["frozen"] > 0 and recorder[1]["frozen"] == 0  # attack, then loss


def test_torch_without_set_stance_compiles_the_last_batch_instead(recorder, monkeypatch,
                                                                   tmp_path) -> None:
    """torch 2.1 to 2.5 (pyproject allows them) have no torch.compiler.set_stance: the
    last, smaller batch compiles its two graphs, as before, rather than fail the epoch."""
    monkeypatch.delattr(torch.compiler, "set_stance")
    metrics = _compiled_trades(tmp_path).fit()
    assert metrics["steps"] == 3 and metrics["bad_steps"] == 0
    assert [g["batch"] for g in recorder] == [4, 4, 2, 2], recorder


def test_evaluating_a_compiled_model_compiles_no_probe_graphs(recorder, make_warm_model,
                                                             sample_batch) -> None:
    """dat.evaluate of a model the user compiled: its two-image probes run the plain
    module (the first graph is the clean forward), and every gradient (torchattacks' PGD,
    dat's CW, the checks) sees the same frozen parameters: one graph per batch size."""
    x, y = sample_batch
    model = make_warm_model()
    report = dat.evaluate(torch.compile(model), (x, y), attacks=["clean", "pgd2", "cw"],
                          batch_size=len(x), progress=False)
    assert {"clean", "pgd2", "cw"} <= set(report["results"])
    assert (recorder[0]["batch"], recorder[0]["grad"]) == (len(x), False)  # the clean pass
    grads = [g for g in recorder if g["grad"]]  # attacks on the still-correct points, checks
    assert all(g["frozen"] > 0 for g in grads), recorder
    assert len({g["batch"] for g in grads}) == len(grads), recorder  # one graph per size
    assert all(p.requires_grad for p in model.parameters())  # unfrozen after
