"""DropBP (paca.drop_backward): exact against an independent detach-based reference, the forward
unchanged, the optimizer skipping dropped branches, accumulation, checkpointing, DDP, the HF
Trainer, LoRA, removal and bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, token_batch

import paca
from paca import dropbp

WORKER = Path(__file__).parent / "distributed_worker.py"


def _adapted(seed=0, **overrides):
    return paca.enable(tiny_llama(seed, dtype=torch.float64, **overrides), r=4, seed=1).train()


def _grads(model, ids):
    for p in model.parameters():
        p.grad = None
    model(ids, labels=ids).loss.backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
            if p.requires_grad}  # fmt: skip


def _detach_reference(model, dropped_names):
    """The authors' form of DropBP, written independently: the dropped branch's output is
    detached where it joins the residual stream."""
    handles = []
    for name, module in model.named_modules():
        if name in dropped_names:
            handles.append(module.register_forward_hook(lambda m, a, out: _detached(out)))
    return handles


def _detached(out):
    return (out[0].detach(), *out[1:]) if isinstance(out, tuple) else out.detach()


def test_gradients_match_a_detach_reference_in_float64():
    ids = token_batch()
    model = _adapted()
    reference = _adapted()
    paca.drop_backward(model, rate=0.5, seed=0)
    controller = dropbp.get(model)
    controller.dropped = frozenset({0, 3})  # layer 0's attention, layer 1's MLP
    names = {controller.branches[i].name for i in controller.dropped}
    assert names == {"model.layers.0.self_attn", "model.layers.1.mlp"}
    got = _grads(model, ids)
    handles = _detach_reference(reference, names)
    want = _grads(reference, ids)
    for h in handles:
        h.remove()
    assert got.keys() == want.keys()
    dropped = [n for n in got if n.startswith(tuple(names))]
    assert dropped and all(got[n] is None and want[n] is None for n in dropped)
    kept = [n for n in got if n not in dropped]
    assert kept and all(got[n] is not None for n in kept)
    for n in kept:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-14, msg=n)


def test_forward_unchanged_and_fewer_bytes_saved():
    ids = token_batch()
    model = _adapted()
    with torch.no_grad():
        want = model(ids).logits
    saved = {}
    for rate in (0.0, 0.5):
        paca.drop_backward(model, rate=rate)
        if rate:
            dropbp.get(model).dropped = frozenset({0, 1, 2})
        count = []

        def pack(t, count=count):
            count.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            got = model(ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        saved[rate] = sum(count)
    assert saved[0.5] < 0.6 * saved[0.0]


def test_rate_zero_trains_bit_exactly_like_paca_alone():
    ids = token_batch()
    runs = []
    for drop in (False, True):
        model = paca.enable(tiny_llama(), r=4, seed=1).train()
        if drop:
            paca.drop_backward(model, rate=0.0, seed=5)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        runs.append({n: layer.delta.detach().clone() for n, layer in paca.paca_layers(model)})
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_optimizer_skips_dropped_branches_and_pattern_changes_per_step():
    ids = token_batch()
    model = paca.enable(tiny_llama(num_hidden_layers=4), r=4, seed=1).train()
    paca.drop_backward(model, rate=0.5, seed=2)
    controller = dropbp.get(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    layers = dict(paca.paca_layers(model))
    patterns = []
    for _ in range(6):
        dropped = controller.dropped
        patterns.append(dropped)
        names = [controller.branches[i].name for i in dropped]
        before = {n: layer.delta.detach().clone() for n, layer in layers.items()}
        steps = {n: opt.state[layer.delta].get("step") for n, layer in layers.items()
                 if layer.delta in opt.state}  # fmt: skip
        for _ in range(2):  # gradient accumulation: the pattern holds for both micro-batches
            model(ids, labels=ids).loss.backward()
            assert controller.dropped == dropped
        opt.step()
        opt.zero_grad()
        for n, layer in layers.items():
            moved = not torch.equal(layer.delta, before[n])
            assert moved != n.startswith(tuple(names)), n
            if not moved and n in steps:  # Adam's per-parameter step count did not advance
                assert torch.equal(opt.state[layer.delta]["step"], steps[n])
    assert controller.steps == 6 and len(set(patterns)) > 1
    assert any(patterns) and all(len(p) < len(controller.branches) for p in patterns)


def test_eval_and_no_grad_are_untouched():
    ids = token_batch()
    model = _adapted()
    paca.drop_backward(model, rate=0.5)
    dropbp.get(model).dropped = frozenset(range(4))
    model.eval()
    grads = _grads(model, ids)  # eval mode with grad enabled: nothing dropped
    assert all(g is not None for g in grads.values())


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = token_batch()
    results = []
    for checkpointing in (False, True):
        model = _adapted()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        paca.drop_backward(model, rate=0.5)
        dropbp.get(model).dropped = frozenset({1, 2})
        results.append(_grads(model, ids))
    assert results[0].keys() == results[1].keys()
    for n, g in results[0].items():
        if g is None:
            assert results[1][n] is None, n
        else:
            torch.testing.assert_close(results[1][n], g, rtol=1e-12, atol=1e-14, msg=n)


def test_unload_merge_and_remove_take_it_off():
    for finish in (paca.unload, paca.merge, paca.remove_drop_backward):
        model = _adapted()
        paca.drop_backward(model, rate=0.5)
        assert "forward" in model.model.layers[0].self_attn.__dict__
        finish(model)
        assert dropbp.get(model) is None
        assert all("forward" not in m.__dict__ for m in model.modules())


def test_lora_and_gpt2():
    peft = pytest.importorskip("peft")
    ids = token_batch()
    model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"])
    )
    paca.drop_backward(model.train(), rate=0.5)
    controller = dropbp.get(model)
    controller.dropped = frozenset({0})
    grads = _grads(model, ids)
    assert grads["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"] is None
    assert (
        grads["base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"] is not None
    )
    gpt2 = paca.enable(tiny_gpt2(), r=4).train()
    paca.drop_backward(gpt2, rate=0.5)
    assert [b.name for b in dropbp.get(gpt2).branches][:2] == [
        "transformer.h.0.attn",
        "transformer.h.0.mlp",
    ]
    # per micro-batch: the hook that draws a pattern is reached through peft's wrapper and GPT-2
    for wrapped, batch in ((model, ids), (gpt2, ids % 50)):
        paca.drop_backward(wrapped, rate=0.5, per="micro-batch")
        for _ in range(2):
            wrapped(input_ids=batch, labels=batch).loss.backward()
        assert dropbp.get(wrapped).forwards == 2


def test_allocate_rates_keeps_the_flop_weighted_mean():
    assert dropbp.allocate_rates(0.5, [1, 1, 1], [1.0, 1.0, 1.0]) == pytest.approx([0.5] * 3)
    rates = dropbp.allocate_rates(0.5, [1, 2, 1, 2], [1.0, 1.0, 4.0, 0.5])
    assert sum(f * p for f, p in zip([1, 2, 1, 2], rates, strict=True)) / 6 == pytest.approx(0.5)
    assert rates[2] < rates[0] < rates[1] < rates[3] <= 0.9


def test_sensitivities_measure_and_leave_the_model_as_it_was():
    ids = token_batch()
    model = _adapted()
    paca.drop_backward(model, rate=0.5)
    controller = dropbp.get(model)
    pattern = controller.dropped
    batch = {"input_ids": ids, "labels": ids}
    scores = dropbp.sensitivities(model, batch)
    assert list(scores) == [b.name for b in controller.branches] and all(
        s > 0 for s in scores.values()
    )
    assert controller.dropped == pattern
    assert all(p.grad is None for p in model.parameters())
    paca.drop_backward(model, rate=0.5, sensitivity=batch)
    controller = dropbp.get(model)
    assert controller.rate == pytest.approx(0.5)
    assert len({b.rate for b in controller.branches}) > 1


def test_bad_input_names_the_fix():
    import copy

    model = _adapted()
    paca.drop_backward(model, rate=0.5)
    with pytest.raises(paca.PacaError, match="remove_drop_backward"):
        copy.deepcopy(model)
    paca.remove_drop_backward(model)
    copy.deepcopy(model)
    with pytest.raises(paca.PacaError, match="rate=1.5"):
        paca.drop_backward(model, rate=1.5)
    from conftest import tiny_bert_classifier

    with pytest.raises(paca.PacaError, match="model_type='bert'.*BRANCHES"):
        paca.drop_backward(tiny_bert_classifier(), rate=0.5)
    with pytest.raises(paca.PacaError, match="sensitivity has no value"):
        paca.drop_backward(model, rate=0.5, sensitivity={"model.layers.0.mlp": 1.0})
    assert dropbp.get(model) is None and all("forward" not in m.__dict__ for m in model.modules())


def test_patterns_bound_the_set_of_patterns_and_follow_the_step():
    model = _adapted(num_hidden_layers=4)
    paca.drop_backward(model, rate=0.5, patterns=3)
    controller = dropbp.get(model)
    seen = []
    for step in range(50):
        controller.steps = step
        seen.append(controller.next_pattern())
    assert set(seen) <= set(controller.patterns) and len(set(seen)) == len(controller.patterns) == 3
    paca.drop_backward(model, rate=0.9, seed=0)  # fresh patterns, a function of (seed, step)
    controller = dropbp.get(model)
    draws = []
    for step in [*range(200), 7]:
        controller.steps = step
        draws.append(controller.next_pattern())
    assert draws[-1] == draws[7] and len(set(draws)) > 20
    assert all(len(p) < len(controller.branches) for p in draws)  # never every branch


def test_hf_trainer_with_accumulation(tmp_path):
    transformers = pytest.importorskip("transformers")
    ids = token_batch(batch=8)
    model = paca.enable(tiny_llama(), r=4, seed=1)
    paca.drop_backward(model, rate=0.5, seed=1)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=1,
    )  # fmt: skip
    trainer = paca.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert dropbp.get(model).steps == 3
    assert all(
        torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h
    )


@pytest.mark.parametrize("per", ["step", "micro-batch"])
def test_ddp_two_processes_match_one(tmp_path, per):
    from distributed_worker import train

    out = tmp_path / "d.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--standalone", str(WORKER), "--engine", "ddp", "--out", str(out)]
    command += ["--drop-backward", "0.5", "--drop-per", per]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(WORKER.parent))
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    got, want = torch.load(out), train(None, "merged", drop=0.5, per=per)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    plain = train(None, "merged")  # without DropBP the deltas differ: something was dropped
    assert any(not torch.allclose(plain[n], want[n]) for n in want)


def test_per_micro_batch_matches_a_detach_reference_and_skips_only_branches_dropped_throughout():
    """per="micro-batch": a fresh pattern at each training forward; the accumulated gradient is
    the sum of each micro-batch's gradient with its own branches detached, and the optimizer
    skips only the branches dropped in every micro-batch of the step."""
    ids = token_batch(batch=4)
    halves = (ids[:2], ids[2:])
    model = _adapted(num_hidden_layers=4)
    reference = _adapted(num_hidden_layers=4)
    paca.drop_backward(model, rate=0.5, seed=3, per="micro-batch")
    controller = dropbp.get(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    names = [b.name for b in controller.branches]
    partly_seen = throughout_seen = False
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(4):
        for p in model.parameters():
            p.grad = None
        patterns = []
        for half in halves:
            model(half, labels=half).loss.backward()
            patterns.append(controller.dropped)
        got = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
               if p.requires_grad}  # fmt: skip
        want = {}
        for half, dropped in zip(halves, patterns, strict=True):
            handles = _detach_reference(reference, {names[i] for i in dropped})
            for n, g in _grads(reference, half).items():
                if g is not None:
                    want[n] = g if want.get(n) is None else want[n] + g
            for h in handles:
                h.remove()
        throughout = patterns[0] & patterns[1]
        partly = (patterns[0] | patterns[1]) - throughout
        partly_seen |= bool(partly)
        throughout_seen |= bool(throughout)
        assert controller.sat_out() == throughout
        for n, g in got.items():
            if n.startswith(tuple(names[i] for i in throughout)):
                assert g is None and want.get(n) is None, n
            else:
                torch.testing.assert_close(g, want[n], rtol=1e-12, atol=1e-14, msg=n)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        for n, p in model.named_parameters():
            if p.requires_grad:
                moved = not torch.equal(p, before[n])
                assert moved != n.startswith(tuple(names[i] for i in throughout)), n
        # the reference follows the same updates, so the next step compares like with like
        reference.load_state_dict(model.state_dict())
    assert partly_seen and throughout_seen and controller.steps == 4
    model.eval()  # no drawing outside training
    forwards = controller.forwards
    model(halves[0])
    assert controller.forwards == forwards
    with pytest.raises(paca.PacaError, match="per='layer'"):
        paca.drop_backward(model, rate=0.5, per="layer")
    paca.remove_drop_backward(model)
    assert not model.model._forward_pre_hooks


def _study_variant():
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    try:
        from smollm2_study import dropbp_variant
    finally:
        sys.path.pop(0)
    return dropbp_variant


def _gpt2_without_dropout():
    model = paca.enable(tiny_gpt2().double(), r=4, seed=1).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the same function in every pattern
    torch.manual_seed(2)  # deltas away from zero, so every branch's Jacobian takes part
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_the_studys_unbiased_variant_is_unbiased_and_dropbp_is_not():
    """scripts/smollm2_study.py measures a variant whose kept branches pass 1 / (1 - p) times
    their gradient down: over all drop patterns, a delta's gradient given that its branch is
    kept then averages to the gradient without DropBP. DropBP itself does not (the claim
    docs/accuracy.md makes for each)."""
    import itertools

    dropbp_variant = _study_variant()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    full = _grads(_gpt2_without_dropout(), ids)
    for variant in (None, "unbiased"):
        with dropbp_variant(variant):
            model = paca.drop_backward(_gpt2_without_dropout(), rate=0.5, seed=0)
        controller = dropbp.get(model)
        n = len(controller.branches)
        mean = {name: torch.zeros_like(g) for name, g in full.items()}
        for pattern in itertools.product((False, True), repeat=n):
            if all(pattern):
                continue  # nothing kept: no gradient for any delta
            controller.dropped = frozenset(i for i in range(n) if pattern[i])
            for name, g in _grads(model, ids).items():
                if g is not None:  # kept: P(pattern) / P(kept) = 0.5**n / 0.5
                    mean[name] += g * 0.5 ** (n - 1)
        errors = [((mean[k] - full[k]).abs().max() / full[k].abs().max()).item() for k in full]
        if variant:
            assert max(errors) < 1e-12, errors
        else:  # the lower layer's deltas miss the dropped branches' paths above them
            assert max(errors) > 1e-2, errors
        paca.remove_drop_backward(model)


def test_the_studys_path_only_and_update_only_variants():
    """The two halves of DropBP the study measures apart, against independent references:
    ``path-only`` (a dropped branch's input detached, its deltas trained) and ``update-only``
    (the full gradient, the dropped branch's deltas left out of the step)."""
    dropbp_variant = _study_variant()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    for variant in ("path-only", "update-only"):
        with dropbp_variant(variant):
            model = paca.drop_backward(_gpt2_without_dropout(), rate=0.5, seed=0)
            controller = dropbp.get(model)
            controller.dropped = frozenset({0, 2})  # layer 0's attention, layer 1's attention
            _grads(model, ids)
            controller.skip_dropped()  # what the optimizer step hook does
            got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        reference = _gpt2_without_dropout()
        handles = []
        if variant == "path-only":  # no gradient reaches the residual stream through them
            for name in ("transformer.h.0.ln_1", "transformer.h.1.ln_1"):
                module = reference.get_submodule(name)
                handles.append(module.register_forward_pre_hook(lambda m, a: (a[0].detach(),)))
        want = _grads(reference, ids)
        for h in handles:
            h.remove()
        for name, g in got.items():
            if variant == "update-only" and name.startswith(("transformer.h.0.attn.",
                                                             "transformer.h.1.attn.")):  # fmt: skip
                assert g is None, name
            else:
                torch.testing.assert_close(g, want[name], rtol=1e-12, atol=1e-14, msg=name)
        plain = _grads(_gpt2_without_dropout(), ids)  # the variants differ from no DropBP
        assert any(not torch.allclose(plain[n], want[n]) for n in want) == (variant == "path-only")
        paca.remove_drop_backward(model)


def test_the_studys_scaled_variants_against_a_hook_reference():
    """``unbiased`` and ``norm-preserving`` in one pattern: DropBP's gradients with every kept
    branch's gradient to its input scaled by 1 / (1 - p) or 1 / sqrt(1 - p), against hooks
    on a plain model (detach the dropped outputs, scale the kept inputs' gradients)."""
    dropbp_variant = _study_variant()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    for variant, scale in (("unbiased", 2.0), ("norm-preserving", 2.0**0.5)):
        with dropbp_variant(variant):
            model = paca.drop_backward(_gpt2_without_dropout(), rate=0.5, seed=0)
            dropbp.get(model).dropped = frozenset({1})  # layer 0's MLP
            got = _grads(model, ids)
        reference = _gpt2_without_dropout()
        handles = _detach_reference(reference, {"transformer.h.0.mlp"})

        def scaled(module, args, scale=scale):
            if not args[0].requires_grad:  # layer 0's input: the frozen embedding's output
                return None
            x = args[0].view_as(args[0])
            x.register_hook(lambda grad, s=scale: grad * s)
            return (x,)

        for name in ("transformer.h.0.ln_1", "transformer.h.1.ln_1", "transformer.h.1.ln_2"):
            handles.append(reference.get_submodule(name).register_forward_pre_hook(scaled))
        want = _grads(reference, ids)
        for h in handles:
            h.remove()
        assert got["transformer.h.0.mlp.c_fc.adapters.default.delta"] is None
        for name, g in got.items():
            if g is not None:
                torch.testing.assert_close(g, want[name], rtol=1e-12, atol=1e-14, msg=name)
        paca.remove_drop_backward(model)
