"""paca.recipes.generate.load: the dtype a base model computes in, on either kind of CPU.

Which precision ``load`` picks by itself depends on the CPU (``runnable_dtype``: a bf16
checkpoint stays bf16 where the CPU computes bf16 natively). Anything compared with an engine
or a stored figure must name its precision instead; these tests force both kinds of CPU through
the backend's probe, so the AVX512-BF16 case is covered on an AVX2-only machine too.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

import paca
from paca import backends
from paca.recipes import generate
from paca.recipes.loading import dtype_argument, load_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "serving_check.py"


@pytest.fixture(scope="module")
def bf16_model(tiny_llama_folder, tmp_path_factory):
    """A tiny LLaMA stored in bf16, as SmolLM2's folder is, with a trained PaCA adapter."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("bf16")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_folder)
    base.to(torch.bfloat16).save_pretrained(folder / "base")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_llama_folder / name).is_file():
            (folder / "base" / name).write_bytes((tiny_llama_folder / name).read_bytes())
    model = paca.enable(AutoModelForCausalLM.from_pretrained(tiny_llama_folder), r=4)
    with torch.no_grad():
        for _, layer in paca.paca_layers(model):
            layer.delta.normal_(0, 0.05)
    paca.save_adapter(model, folder / "adapter")
    return folder / "base", folder / "adapter"


def _cpu(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(backends, "bf16_support", lambda device: (native, "forced by the test"))


@pytest.mark.parametrize("native", [True, False], ids=["avx512-bf16", "avx2"])
def test_load_picks_the_dtype_by_cpu_unless_told(bf16_model, monkeypatch, native):
    base, adapter = bf16_model
    _cpu(monkeypatch, native)
    model, _ = generate.load(adapter, str(base))
    # the trap: left to itself, the precision follows the CPU. Where bf16 is native the
    # checkpoint loads as transformers loads it by default (its stored bf16 since transformers
    # 5; fp32 in 4.x, the Gaudi pins), elsewhere in fp32
    default = next(load_model(str(base)).parameters()).dtype
    assert next(model.parameters()).dtype == (default if native else torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = generate.load(adapter, str(base), dtype=dtype)
        assert {p.dtype for p in model.parameters() if not p.requires_grad} == {dtype}


@pytest.mark.parametrize("native", [True, False], ids=["avx512-bf16", "avx2"])
def test_serving_reference_computes_in_fp32_on_any_cpu(bf16_model, monkeypatch, native):
    """scripts/serving_check.py's reference (paca's answers that vLLM and llama.cpp must match,
    both running fp32) loads in fp32 on either CPU, and its answers equal a dense fp32 model's."""
    spec = importlib.util.spec_from_file_location("serving_check", SCRIPT)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    base, adapter = bf16_model
    _cpu(monkeypatch, native)
    model, tokenizer = check.reference_model(str(adapter), str(base), "fp32")
    assert next(model.parameters()).dtype == torch.float32
    bf16, _ = check.reference_model(str(adapter), str(base), "bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    # fp32 answers are those of the merged model computed densely in fp32
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(base, **dtype_argument(torch.float32))
    dense = paca.merge(paca.load_adapter(fp32, adapter)).eval()
    ids = generate.prompt_ids(tokenizer, "Which module has json.dumps?")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
