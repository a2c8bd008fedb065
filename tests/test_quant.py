"""QPaCA: PaCA beside quantized and forward-only base layers (additive mode)."""

import sys

import pytest
import torch
import transformers
from conftest import tiny_llama, train_lm
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import paca
from paca import quant
from paca.recipes.loading import dtype_argument

bnb = pytest.importorskip("bitsandbytes")

IN, OUT = 96, 80  # distinct from every activation dimension below


class Int8ForwardOnly(nn.Module):
    """A stand-in for GPTQ/AWQ-style layers: int8 weight and per-row scales in buffers, no
    ``weight`` attribute, a forward (and input gradient) computed by a fused int8 kernel that
    never builds the float weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scales = w.abs().amax(dim=1) / 127
        qweight = torch.round(w / scales[:, None]).to(torch.int8)
        self.register_buffer("qweight", qweight)
        self.register_buffer("qweight_t", qweight.t().contiguous())
        self.register_buffer("scales", scales)
        self.register_buffer("bias", linear.bias.detach().clone())

    def dense(self) -> torch.Tensor:  # for the reference only
        return self.qweight.double() * self.scales.double()[:, None]

    def forward(self, x):
        return _Int8Matmul.apply(x, self.qweight, self.qweight_t, self.scales) + self.bias


class _Int8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qweight, qweight_t, scales):
        ctx.save_for_backward(qweight_t, scales)
        flat = x.reshape(-1, x.shape[-1])
        return torch.ops.aten._weight_int8pack_mm(flat, qweight, scales).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        qweight_t, scales = ctx.saved_tensors
        flat = (grad * scales).reshape(-1, grad.shape[-1])
        ones = torch.ones(qweight_t.shape[0], dtype=grad.dtype)
        gx = torch.ops.aten._weight_int8pack_mm(flat, qweight_t, ones)
        return gx.view(*grad.shape[:-1], -1), None, None, None


def float_linear(seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT)


def bnb_4bit(linear: nn.Linear, quant_type: str) -> nn.Module:
    layer = bnb.nn.Linear4bit(
        IN, OUT, bias=True, compute_dtype=torch.float32, quant_type=quant_type
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.detach().clone(), requires_grad=False, quant_type=quant_type
    )
    layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")  # quantizes


def bnb_8bit(linear: nn.Linear) -> nn.Module:
    layer = bnb.nn.Linear8bitLt(IN, OUT, bias=True, has_fp16_weights=False, threshold=0.0)
    layer.weight = bnb.nn.Int8Params(
        linear.weight.detach().clone(), requires_grad=False, has_fp16_weights=False
    )
    layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")


def reference_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's float weight, read independently of paca.quant."""
    if isinstance(layer, Int8ForwardOnly):
        return layer.dense()
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    return layer.weight.data.double() * scb.double()[:, None] / 127


KINDS = {
    "nf4": lambda lin: bnb_4bit(lin, "nf4"),
    "fp4": lambda lin: bnb_4bit(lin, "fp4"),
    "int8": bnb_8bit,
    "forward-only": Int8ForwardOnly,
}


class Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def adapted(kind: str, seed=0):
    base = KINDS[kind](float_linear(seed))
    model = paca.enable(Holder(base), r=8, alpha=16, target_modules=["proj"], seed=seed)
    layer = model.proj
    with torch.no_grad():
        layer.delta.copy_(
            torch.randn(layer.delta.shape, generator=torch.Generator().manual_seed(1))
        )
    return model, layer, base


@pytest.mark.parametrize("kind", list(KINDS))
def test_exact_against_the_dequantized_weight_with_replaced_columns(kind):
    model, layer, base = adapted(kind)
    assert layer.mode == "additive" and layer.base_layer is base
    x = torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(2), requires_grad=True)
    g = torch.randn(3, 5, OUT, generator=torch.Generator().manual_seed(3))
    y = model(x)
    y.backward(g)

    w = reference_weight(base)
    w[:, layer.idx] += layer.scaling * layer.delta.detach().double()
    x64, g64 = x.detach().double(), g.double()
    y_ref = x64 @ w.t() + base.bias.double()
    grad_x_ref = g64 @ w
    grad_delta_ref = layer.scaling * g64.reshape(-1, OUT).t() @ x64.reshape(-1, IN)[:, layer.idx]
    # fp32 compute against a float64 reference: relative to each tensor's largest entry
    for got, want in ((y, y_ref), (x.grad, grad_x_ref), (layer.delta.grad, grad_delta_ref)):
        scale = want.abs().max()
        assert (got.double() - want).abs().max() / scale < 2e-5, kind


@pytest.mark.parametrize("kind", list(KINDS))
def test_training_keeps_the_base_quantized(kind):
    model, layer, base = adapted(kind)
    before = {n: t.clone() for n, t in base.state_dict().items() if isinstance(t, torch.Tensor)}
    opt = torch.optim.AdamW([layer.delta], lr=1e-2)
    for _ in range(3):
        model(torch.randn(4, IN)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert type(layer.base_layer) is type(base)
    for name, tensor in base.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name]), name
    assert [p for p in model.parameters() if p.requires_grad] == [layer.delta]


class FloatWeightSizes(TorchDispatchMode):
    """Counts floating-point tensors of ``OUT x IN`` elements created by any ATen op."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        for t in outs:
            if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.numel() == OUT * IN:
                self.count += 1
        return out


def weight_sized_allocations(module: nn.Module) -> int:
    x = torch.randn(2, 3, IN, requires_grad=True)
    counter = FloatWeightSizes()
    with counter:
        module(x).sum().backward()
    return counter.count


@pytest.mark.parametrize("kind", list(KINDS))
def test_paca_allocates_no_float_weight_per_call(kind):
    model, layer, base = adapted(kind)
    # whatever the base kernel itself does (bitsandbytes on CPU dequantizes in its forward),
    # paca adds nothing of out x in
    assert weight_sized_allocations(model) == weight_sized_allocations(base)
    if kind == "forward-only":
        assert weight_sized_allocations(model) == 0  # fused int8 kernel: nothing at all


@pytest.mark.parametrize("kind", list(KINDS))
def test_merge_dequantizes_and_keeps_the_function(kind):
    model, layer, base = adapted(kind)
    x = torch.randn(7, IN)
    with torch.no_grad():
        want = model(x).double()
    merged = paca.merge(model)
    assert type(merged.proj) is nn.Linear and merged.proj.weight.dtype == torch.float32
    with torch.no_grad():
        got = merged.proj(x).double()
    assert (got - want).abs().max() / want.abs().max() < 1e-5


def test_merge_refuses_a_non_linear_forward_only_layer_and_leaves_the_model():
    class Squares(Int8ForwardOnly):
        def forward(self, x):
            return super().forward(x) ** 2

    model = paca.enable(Holder(Squares(float_linear())), r=4, target_modules=["proj"])
    with pytest.raises(ValueError, match="Squares: its forward is not linear in x"):
        paca.merge(model)
    assert isinstance(model.proj, paca.PacaLinear) and isinstance(model.proj.base_layer, Squares)


def test_unsupported_layer_type_is_named_with_what_is_supported():
    class FusedQKV4bit(nn.Module):  # quantized, but declares no in/out features
        def __init__(self):
            super().__init__()
            self.register_buffer("packed", torch.zeros(16, 8, dtype=torch.uint8))

        def forward(self, x):
            return x

    model = Holder(FusedQKV4bit())
    with pytest.raises(ValueError) as err:
        paca.enable(model, r=4, target_modules=["proj"])
    message = str(err.value)
    assert "FusedQKV4bit" in message and "Linear4bit" in message and "in_features" in message
    assert type(model.proj) is FusedQKV4bit


def test_quantization_without_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now fails
    with pytest.raises(ValueError, match=r"needs bitsandbytes.*pip install 'paca\[quant\]'"):
        quant.bnb_config("4bit")
    with pytest.raises(ValueError, match="choose one of"):
        quant.bnb_config("3bit")


def test_forward_only_layers_are_found_by_all_linear():
    model = nn.Sequential(Int8ForwardOnly(float_linear()), nn.ReLU(), nn.Linear(OUT, 4))
    paca.enable(model, r=4, target_modules="all-linear")
    assert [n for n, _ in paca.paca_layers(model)] == ["0", "2"]
    assert model[0].mode == "additive" and model[2].mode == "merged"


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    tiny_llama().save_pretrained(folder)
    return folder


def load_quantized(folder, bits, dtype=torch.float32):
    # the dtype of the unquantized rest given explicitly: transformers 4.x would pick float16
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant.bnb_config(bits), **dtype_argument(dtype)
    )


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_hugging_face_quantized_model_trains_saves_loads_and_merges(llama_folder, bits, tmp_path):
    kind = bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt
    model = paca.enable(load_quantized(llama_folder, bits), r=8, alpha=16)
    layers = paca.paca_layers(model)
    assert len(layers) == 14 and all(
        layer.mode == "additive" and type(layer.base_layer) is kind for _, layer in layers
    )
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = train_lm(model, ids, 12)
    assert losses[-1] < losses[0] - 0.3
    for _, layer in layers:
        assert type(layer.base_layer) is kind
        assert layer.base_layer.weight.dtype == (torch.uint8 if bits == "4bit" else torch.int8)
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    paca.save_adapter(model, tmp_path / "adapter")
    fresh = paca.load_adapter(load_quantized(llama_folder, bits), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(ids).logits, want, atol=1e-5)
    with torch.no_grad(), paca.disabled(fresh):
        untrained = fresh(ids).logits
    merged = paca.merge(fresh)
    assert not paca.paca_layers(merged)
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        gap = (merged(ids).logits - want).abs().max().item()
    if bits == "4bit":  # computes with the dequantized weight: the merged copy matches
        assert gap < 1e-4
    else:
        # LLM.int8 also rounds the activations (to fp16, then int8 rows), which a floating-point
        # copy does not (about 0.5% of the largest logit here); the trained update is far larger
        assert gap < 0.2 * (untrained - want).abs().max().item()


def test_merge_gives_quantized_layers_the_dtype_of_the_rest_of_the_model(llama_folder):
    model = paca.enable(load_quantized(llama_folder, "4bit", dtype=torch.float16), r=4)
    for _, layer in paca.paca_layers(model):
        torch.nn.init.normal_(layer.delta, std=0.05)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval()(ids).logits.float()
    merged = paca.merge(model)
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.float16
    with torch.no_grad():  # runs (a float32 layer among float16 ones would not) and agrees
        got = merged(ids).logits.float()
    assert (got - want).abs().max() < 2e-2 * want.abs().max()


def test_hugging_face_trainer_accepts_a_quantized_paca_model(llama_folder, tmp_path):
    from paca.integrations.hf import quantized_training

    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    model = load_quantized(llama_folder, "4bit")
    with pytest.raises(ValueError, match="purely quantized"):  # transformers' own refusal
        transformers.Trainer(model=model, args=args)
    with pytest.raises(ValueError, match="has no PaCA adapters: call paca.enable"):
        with quantized_training(model):
            pass
    paca.enable(model, r=4)
    with quantized_training(model):
        trainer = transformers.Trainer(model=model, args=args)
    assert trainer.model is model and "_hf_peft_config_loaded" not in vars(model)
    assert not model._hf_peft_config_loaded  # transformers' class default again


def test_a_new_quantized_layer_type_is_one_dequantizer_and_one_registration(monkeypatch):
    class Packed(Int8ForwardOnly):
        """A layer whose scales paca is told how to read (no probing)."""

    monkeypatch.setattr(quant, "DEQUANTIZERS", list(quant.DEQUANTIZERS))
    quant.register_dequantizer("test packed", lambda m: isinstance(m, Packed))(lambda m: m.dense())

    def no_probe(module, block=1024):
        raise AssertionError("the registered dequantizer should have been used")

    monkeypatch.setattr(quant, "_probe", no_probe)
    layer = Packed(float_linear())
    assert torch.equal(quant.dequantize(layer, torch.float64), layer.dense())
    model = paca.enable(Holder(layer), r=4, target_modules=["proj"])
    x = torch.randn(3, IN)
    with torch.no_grad():
        want = model(x)
    merged = paca.merge(model)
    torch.testing.assert_close(merged.proj(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_eval_without_grad_keeps_the_4bit_training_kernel(quant_type):
    # bitsandbytes switches a Linear4bit in eval mode, on an input without grad, on CPUs with
    # AVX512-BF16, to a packed format with its own kernel; OUT=80 is no multiple of its block,
    # where that conversion fails outright. paca keeps adapted layers on the training kernel.
    base = bnb_4bit(float_linear(), quant_type)
    setting = getattr(base, "support_avx512bf16_for_cpu", None)
    model = paca.enable(Holder(base), r=8, target_modules=["proj"])
    layer = model.proj
    with torch.no_grad():
        layer.delta.copy_(torch.randn(layer.delta.shape))
    x = torch.randn(5, IN)
    model.train()
    with torch.no_grad():
        train_out = model(x)
    model.eval()
    with torch.no_grad():
        eval_out = model(x)
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(eval_out, train_out), "eval ran another kernel than training"
    want = x.double() @ reference_weight(base).t() + base.bias.double()
    want = want + layer.scaling * x.double()[:, layer.idx] @ layer.delta.double().t()
    assert (eval_out.double() - want).abs().max() / want.abs().max() < 1e-5
    paca.unload(model)
    assert getattr(base, "support_avx512bf16_for_cpu", None) == setting, "unload restores it"


def test_a_4bit_layer_packed_before_enable_is_unpacked():
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never packs here")
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)  # shapes the packed path accepts
    base = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False)
    base.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    base = base.to("cpu").eval()
    with torch.no_grad():
        base(torch.randn(2, 128))  # bitsandbytes packs the weight now
    assert base.weight.quant_state.packing_format_for_cpu
    model = paca.enable(Holder(base), r=4, target_modules=["proj"])
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    x = torch.randn(3, 128, requires_grad=True)
    model.train()
    model(x).sum().backward()  # the training kernel, with an input gradient
    assert x.grad is not None and torch.isfinite(x.grad).all()
