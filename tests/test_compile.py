"""torch.compile(fullgraph=True) of an adapted model: one graph, no recompiles, eager's losses."""

import pytest
import torch
from conftest import tiny_llama, token_batch

import paca


def _losses(model, steps, compiled):
    ids = token_batch(batch=2, seq=16)
    forward = torch.compile(model, fullgraph=True, dynamic=False) if compiled else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(steps):
        loss = forward(input_ids=ids, labels=ids, use_cache=False).loss  # training: no KV cache
        loss.backward()
        opt.step()  # the optimizer hook re-writes the merged columns between graphs
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("mode", ["merged", "additive"])
def test_compiled_training_matches_eager_without_recompiles(mode):
    torch._dynamo.reset()
    eager = _losses(paca.enable(tiny_llama(), r=4, mode=mode), 5, compiled=False)
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = _losses(paca.enable(tiny_llama(), r=4, mode=mode), 5, compiled=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before
    assert graphs == 1, f"expected one graph for the whole model, got {graphs}"
    assert eager[-1] < eager[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_drop_backward_compiles_one_graph_per_pattern_and_matches_eager():
    torch._dynamo.reset()

    def run(compiled):
        model = paca.enable(tiny_llama(num_hidden_layers=3), r=4)
        paca.drop_backward(model, rate=0.5, seed=1, patterns=2)
        return _losses(model, 6, compiled=compiled)

    eager = run(False)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = run(True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    # seed 1 uses both patterns in 6 steps: one graph each, no more
    assert graphs == 2, f"expected one graph per pattern, got {graphs}"
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_drop_backward_per_micro_batch_compiles_with_graph_breaks_and_matches_eager():
    """per="micro-batch" draws each pattern in a forward pre-hook: torch.compile without
    fullgraph runs that draw between graphs, with eager's patterns and losses."""
    from paca import dropbp

    def run(compiled):
        torch._dynamo.reset()
        model = paca.enable(tiny_llama(num_hidden_layers=3), r=4)
        paca.drop_backward(model, rate=0.5, seed=1, patterns=2, per="micro-batch")
        forward = torch.compile(model, dynamic=False) if compiled else model
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids, losses, patterns = token_batch(batch=2, seq=16), [], []
        model.train()
        for _ in range(3):
            for _ in range(2):  # two micro-batches per step
                loss = forward(input_ids=ids, labels=ids, use_cache=False).loss
                patterns.append(dropbp.get(model).dropped)
                loss.backward()
                losses.append(loss.detach())
            opt.step()
            opt.zero_grad()
        return torch.stack(losses), patterns

    eager, eager_patterns = run(False)
    compiled, compiled_patterns = run(True)
    assert compiled_patterns == eager_patterns and len(set(eager_patterns)) == 2
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
