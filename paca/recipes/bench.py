"""``paca bench``: PaCA against LoRA, DoRA, full fine-tuning and the frozen-model limit.

All methods train copies of one model in one process, interleaved round by round, so machine
drift hits them alike; ratios are medians of per-round ratios. Besides time, three
hardware-independent figures: bytes saved for backward (``saved_tensors_hooks``, each storage
once, parameters and buffers excluded), ATen ops dispatched per step (each is at least one
kernel launch on a GPU or HPU), and trainable parameters. Peak process memory is measured with
each method alone in a subprocess.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import paca
from paca import backends, ops, quant
from paca.errors import MissingDependency, PacaError
from paca.recipes.loading import dtype_argument
from paca.targets import DEFAULT_TARGETS

METHODS = (
    "frozen",
    "paca",
    "paca-additive",
    "lora",
    "dora",
    "full",
    "paca-dropbp",
    "lora-dropbp",
    "frozen-aa",
    "peft-paca",
)
# "frozen-aa" is a second copy of the frozen model: its "x frozen" is the noise of the ratios on
# this machine (an A/A comparison), measured in the same rounds as everything else. "peft-paca"
# is PEFT's own PaCA (peft >= 0.22, or its unreleased branch built by hand): the peer a PEFT
# user reaches for first; asked for by name, since released peft up to 0.21 lacks it
DEFAULT_METHODS = tuple(m for m in METHODS if m != "peft-paca")
ARCHITECTURES = ("llama", "mistral", "qwen2")
OPTIMIZERS = ("single", "foreach", "fused")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # short name -> torch's name
# named workloads: shapes of a real model built from a config (random weights)
PRESETS = {
    # SmolLM2-135M's layers (hidden 576, MLP 1536, 30 layers, 9 heads) with a smaller vocabulary
    # and all heads as KV heads (a LLaMA config built by this bench)
    "smollm2": {"model": "llama", "hidden": 576, "layers": 30, "vocab": 8000},
    # SmolLM2's depth (210 adapted layers) at tiny width and few tokens: the arithmetic is
    # negligible, so the time is each method's per-layer cost of dispatching ops and running
    # Python: the regime of a GPU or HPU step, which launches kernels faster than it fills them
    "overhead": {"model": "llama", "hidden": 64, "layers": 30, "vocab": 256, "seq": 16},
    "default": {},
}


@dataclass
class BenchConfig:
    """Settings of ``paca bench``.

    Attributes:
        model (str): a config name (``llama``, ``mistral``, ``qwen2``: built from a config with
            ``hidden``/``layers``/``vocab``), ``smollm2`` (the real SmolLM2-135M-Instruct of
            ``paca train``, dequantized Q4_1) or a local Hugging Face model folder.
        hidden (int): hidden size of a model built from a config.
        layers (int): decoder layers of a model built from a config.
        vocab (int): vocabulary of a model built from a config.
        seq (int): tokens per sequence.
        batch (int): sequences per step.
        r (int): PaCA and LoRA rank.
        alpha (float): PaCA and LoRA alpha.
        dtype (str): ``float32`` (``fp32``) or ``bfloat16`` (``bf16``): as ``paca train
            --precision``, bf16 means frozen weights in bf16 with every trained tensor and the
            optimizer state in fp32, under bf16 autocast (full fine-tuning: fp32 weights under
            bf16 autocast).
        device (str): ``cpu``, ``cuda``, ``hpu`` or ``auto``.
        methods (list[str]): a subset of ``METHODS`` (default ``DEFAULT_METHODS``); ``dora`` and
            ``peft-paca`` are skipped if peft lacks them;
            ``frozen-aa`` (a second frozen copy) shows the noise of the ratios.
        rounds (int): timed rounds (each method one step per round).
        warmup (int): untimed rounds first.
        peak_memory (bool): measure each method's peak memory in its own subprocess.
        output (str): folder for ``bench.json``, ``bench.md`` (and ``bench.png``).
        plot (bool): also draw ``bench.png`` (needs matplotlib: ``pip install paca[plot]``).
        seed (int): seed of the model and inputs.
        quantize (str | None): ``"4bit"`` (nf4) or ``"8bit"`` (LLM.int8): the base model's
            linear layers are bitsandbytes layers, so ``paca`` is QPaCA and ``lora`` is QLoRA
            (same base quantization, same r and targets); ``full`` and ``dora`` are skipped.
        optim (str): AdamW as ``single`` (one tensor at a time, ``foreach=False``: op counts
            compare), ``foreach`` or ``fused`` (the HF Trainer's default ``adamw_torch_fused``).
        drop_rate (float): DropBP rate of the ``*-dropbp`` methods (``paca.drop_backward``).
        compile (bool): ``torch.compile`` each method's model (timed after the warm-up rounds).
    """

    model: str = "llama"
    hidden: int = 1024
    layers: int = 4
    vocab: int = 32000
    seq: int = 256
    batch: int = 2
    r: int = 8
    alpha: float = 16.0
    dtype: str = "float32"
    device: str = "cpu"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    rounds: int = 5
    warmup: int = 1
    peak_memory: bool = True
    output: str = "paca-bench"
    plot: bool = False
    seed: int = 0
    quantize: str | None = None
    optim: str = "single"
    drop_rate: float = 0.5
    compile: bool = False

    @classmethod
    def preset(cls, name: str, **overrides) -> BenchConfig:
        """A named workload (``PRESETS``), fields in ``overrides`` winning."""
        if name not in PRESETS:
            raise PacaError(f"preset={name!r}: choose one of {list(PRESETS)}")
        return cls(**(PRESETS[name] | overrides))

    @classmethod
    def quick(cls, **overrides) -> BenchConfig:
        """Tiny shapes and one round: checks the harness, not the hardware."""
        settings = dict(hidden=64, layers=2, vocab=256, seq=32, batch=2, rounds=1, warmup=1)
        settings["peak_memory"] = False
        return cls(**(settings | overrides))

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise PacaError(f"unknown bench methods {unknown}; choose from {list(METHODS)}")
        self.dtype = DTYPES.get(self.dtype, self.dtype)
        if self.dtype not in DTYPES.values():
            raise PacaError(f"dtype={self.dtype!r}: use fp32 (float32) or bf16 (bfloat16)")
        if self.optim not in OPTIMIZERS:
            raise PacaError(f"optim={self.optim!r}: choose one of {list(OPTIMIZERS)}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise PacaError(f"drop_rate={self.drop_rate} must lie in [0, 1)")
        if self.quantize is not None and self.quantize not in quant.BITS:
            raise PacaError(f"quantize={self.quantize!r}: choose one of {list(quant.BITS)}")
        for name in ("hidden", "layers", "vocab", "seq", "batch", "r", "rounds"):
            if getattr(self, name) < 1:
                raise PacaError(f"{name}={getattr(self, name)} must be >= 1")


# -- the model and the methods ------------------------------------------------------------------


def build_model(cfg: BenchConfig) -> nn.Module:
    """The base model: built from a config (random weights) or loaded from a local folder."""
    import transformers

    torch.manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.dtype)
    if cfg.model in ARCHITECTURES:
        config_cls = {
            "llama": transformers.LlamaConfig,
            "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config,
        }[cfg.model]
        heads = max(1, cfg.hidden // 64)
        config = config_cls(
            vocab_size=cfg.vocab,
            hidden_size=cfg.hidden,
            # LLaMA's MLP width: 8/3 of hidden, rounded up to a multiple of 256
            intermediate_size=-(-(8 * cfg.hidden // 3) // 256) * 256,
            num_hidden_layers=cfg.layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max(2048, cfg.seq),
            tie_word_embeddings=False,
        )
        model = transformers.AutoModelForCausalLM.from_config(config)
    else:
        path = Path(cfg.model)
        if cfg.model == "smollm2" and not path.exists():
            from paca.recipes import smollm2

            path = smollm2.model_folder()
        if not (path / "config.json").is_file():
            raise PacaError(
                f"model={cfg.model!r} is neither a config name {list(ARCHITECTURES)}, smollm2, "
                "nor a local model folder with a config.json"
            )
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    # .to(dtype) rather than a dtype argument, whose name differs between transformers 4 and 5
    model = model.to(dtype).eval()
    if cfg.quantize is None:
        return model
    # Quantized as users get it: saved, then loaded with a BitsAndBytesConfig (lm_head stays as is).
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        config = quant.bnb_config(cfg.quantize, compute_dtype=dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=config, **dtype_argument(dtype)
        )
    return model.eval()


def _targets(model: nn.Module) -> list[str] | str:
    """PaCA's default targets for the architecture (as suffixes, for peft too)."""
    targets = DEFAULT_TARGETS.get(getattr(model.config, "model_type", None))
    return targets if isinstance(targets, list) else "all-linear"


def prepare(method: str, base: nn.Module, cfg: BenchConfig, device: torch.device, copy_model=True):
    """``base`` (or a copy) set up for ``method``, and its optimizer (``None`` for frozen)."""
    model = copy.deepcopy(base) if copy_model else base
    targets = _targets(base)
    if method in ("frozen", "frozen-aa"):
        model.requires_grad_(False)
    elif method in ("paca", "paca-additive", "paca-dropbp"):
        mode = "additive" if method == "paca-additive" else "auto"
        paca.enable(
            model, r=cfg.r, alpha=cfg.alpha, target_modules=targets, device=str(device), mode=mode
        )
    elif method in ("lora", "dora", "lora-dropbp"):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            target_modules=targets,
            lora_dropout=0.0,
            use_dora=method == "dora",
        )
        model = get_peft_model(model, lora)
    elif method == "peft-paca":
        from peft import PacaConfig, get_peft_model

        model = get_peft_model(
            model, PacaConfig(r=cfg.r, paca_alpha=cfg.alpha, target_modules=targets)
        )
    elif method == "full":
        model.float().requires_grad_(True)  # fp32 master weights; bf16 compute under autocast
    if method.endswith("-dropbp"):
        paca.drop_backward(model, rate=cfg.drop_rate, seed=cfg.seed)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.optim) if params else None
    if cfg.compile:
        model = torch.compile(model)
    return model, optimizer


def make_optimizer(params, optim: str) -> torch.optim.Optimizer:
    """AdamW one tensor at a time (``single``: the op counts of the methods compare),
    ``foreach`` or ``fused``."""
    flags = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    return torch.optim.AdamW(params, lr=1e-5, **flags[optim])


def make_inputs(base: nn.Module, cfg: BenchConfig, device: torch.device):
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    ids = torch.randint(0, base.config.vocab_size, (cfg.batch, cfg.seq), generator=generator)
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)
    return embeds.to(device), ids.to(device)


def _autocast(embeds: torch.Tensor):
    """bf16 autocast for a bf16 benchmark (what the Trainer's ``bf16=True`` does)."""
    bf16 = embeds.dtype == torch.bfloat16
    return torch.autocast(embeds.device.type, torch.bfloat16, enabled=bf16)


def train_step(model, optimizer, embeds, labels) -> None:
    # Every method gets a leaf input that requires grad, so all of them run the full
    # input-gradient backward; "frozen" then differs only by having no weight gradient at all.
    x = embeds.detach().requires_grad_(True)
    with _autocast(embeds):
        loss = model(inputs_embeds=x, labels=labels).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# -- the counters --------------------------------------------------------------------------------


class OpCounter(TorchDispatchMode):
    """Counts ATen ops as dispatched; a paca op counts the ATen ops its backend kernel runs."""

    def __init__(self, device_type: str):
        super().__init__()
        self.kernels = ops.REFERENCE | backends.load(device_type).KERNELS
        self.ops = 0
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "paca":
            with self:
                return self.kernels[func._opname](*args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            # Seen only inside a paca kernel: decompose as the dispatcher would outside one.
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        self.ops += 1
        self.views += bool(func.is_view)
        return func(*args, **kwargs)


def saved_bytes(model, optimizer, embeds, labels) -> int:
    """Bytes saved for backward in one step: each storage once, parameters and buffers excluded."""
    owned = {
        t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())
    }
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    x = embeds.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(embeds):
        loss = model(inputs_embeds=x, labels=labels).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sum(seen.values())


def _proc_status_bytes(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _rss_bytes() -> int:
    return _proc_status_bytes("VmRSS") or 0


def _peak_rss_bytes() -> int:
    # VmHWM belongs to this address space. ru_maxrss would not do: Linux carries it over
    # fork and exec, so a worker started by a large parent would report the parent's peak.
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measure_memory(method: str, cfg: BenchConfig, steps: int = 2) -> dict:
    """Runs ``method`` alone in this process; called in a subprocess by ``run``.

    ``used`` is what training needs: the accelerator's peak allocation, or on the CPU the
    peak resident memory above the interpreter and its libraries (measured before the model
    is built).
    """
    # Import what any method may use before the baseline, so library code is not counted
    # against the method that happens to import it (peft for LoRA).
    import transformers.models.llama.modeling_llama  # noqa: F401

    try:
        import peft  # noqa: F401
    except ImportError:
        pass
    baseline = _rss_bytes()
    device = backends.resolve_device(cfg.device)
    base = build_model(cfg)
    embeds, labels = make_inputs(base, cfg, device)
    model, optimizer = prepare(method, base, cfg, device, copy_model=False)
    backends.reset_device_memory(device)
    for _ in range(steps):
        train_step(model, optimizer, embeds, labels)
    backends.synchronize(device)
    peak, accelerator = _peak_rss_bytes(), backends.device_memory(device)
    used = accelerator["max_memory_allocated"] if accelerator else peak - baseline
    return {"used": used, "peak_rss": peak, "rss_baseline": baseline, "device": accelerator}


def _memory_in_subprocess(method: str, cfg: BenchConfig) -> dict:
    command = [
        sys.executable,
        "-m",
        "paca.recipes.bench",
        "--worker",
        method,
        json.dumps(dataclasses.asdict(cfg)),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        # An out-of-memory kill or error: the caller treats it as "does not fit".
        return {"error": (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_bytes(text: str) -> int:
    """``"4GiB"``, ``"512MiB"``, ``"2GB"``, ``"1000000"`` -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    units |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in units or float(match.group(1)) <= 0:
        raise PacaError(
            f"memory budget {text!r} is not a positive size; write it like 4GiB or 512MiB"
        )
    return int(float(match.group(1)) * units[match.group(2)])


def max_seq(
    cfg: BenchConfig, budget: int, step: int = 64, limit: int = 1 << 16, progress: bool = True
) -> dict:
    """Longest sequence (a multiple of ``step``) each method trains within ``budget`` bytes.

    Each probe runs one method at one length in its own subprocess (two training steps);
    lengths double until a probe does not fit, then bisect.
    """
    from tqdm.auto import tqdm

    methods, skipped = available_methods(cfg)
    found: dict[str, dict] = {}
    with tqdm(desc="paca bench --max-seq", disable=not progress, leave=False) as bar:
        for method in methods:
            probes: dict[int, int | None] = {}

            def fits(seq: int, method=method, probes=probes) -> bool:
                bar.set_postfix_str(f"{method} seq {seq}")
                result = _memory_in_subprocess(method, dataclasses.replace(cfg, seq=seq))
                probes[seq] = result.get("used")
                bar.update()
                return result.get("used") is not None and result["used"] <= budget

            good, bad = 0, None
            seq = step
            while seq <= limit:
                if fits(seq):
                    good, seq = seq, seq * 2
                else:
                    bad = seq
                    break
            while bad is not None and bad - good > step:
                middle = (good + bad) // 2 // step * step
                if fits(middle):
                    good = middle
                else:
                    bad = middle
            found[method] = {
                "max_seq": good,
                "probes": {str(k): v for k, v in sorted(probes.items())},
            }
    lora = found.get("lora", {}).get("max_seq")
    for row in found.values():
        row["x_lora"] = row["max_seq"] / lora if lora else None
    return {"budget_bytes": budget, "step": step, "methods": found, "skipped": skipped}


# -- the run -------------------------------------------------------------------------------------


def available_methods(cfg: BenchConfig) -> tuple[list[str], dict[str, str]]:
    methods, skipped = [], {}
    for method in cfg.methods:
        if cfg.quantize and method in ("full", "dora"):
            skipped[method] = f"not run on a {cfg.quantize} base"
            continue
        if method in ("lora", "dora", "lora-dropbp"):
            try:
                import peft
                from peft import LoraConfig
            except ImportError:
                skipped[method] = "peft is not installed (pip install paca[dev])"
                continue
            if method == "dora" and "use_dora" not in LoraConfig.__dataclass_fields__:
                skipped[method] = f"peft {peft.__version__} has no DoRA"
                continue
        if method == "peft-paca":
            try:
                import peft
            except ImportError:
                skipped[method] = "peft is not installed (pip install paca[dev])"
                continue
            if not hasattr(peft, "PacaConfig"):
                skipped[method] = f"peft {peft.__version__} has no PaCA (peft >= 0.22 has)"
                continue
        methods.append(method)
    return methods, skipped


def _minor_faults() -> int | None:
    """Minor page faults of this process so far (``None`` where ``resource`` is missing).

    Per step, they show fresh memory being mapped and zeroed: on CPU, glibc's allocator can
    return freed heap to the system and fault it back in on the next step, which a method's
    step time then includes (docs/benchmarks.md); accelerators' caching allocators do not."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _cpu_name() -> str:
    """The CPU's model name and its bf16 features (``/proc/cpuinfo`` on Linux)."""
    import platform

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    found = set(flags.group(1).split()) if flags else set()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    have = ", ".join(f for f in wanted if f in found) or "none of " + ", ".join(wanted)
    return f"{name.group(1).strip() if name else platform.machine()} ({have})"


def _median_ratio(times: dict[str, list[float]], method: str, reference: str) -> float | None:
    if reference not in times:
        return None
    return statistics.median(a / b for a, b in zip(times[method], times[reference], strict=True))


def run(cfg: BenchConfig | None = None, progress: bool = True) -> dict:
    """Runs the benchmark and returns the results (also written to ``cfg.output``)."""
    from tqdm.auto import tqdm

    cfg = cfg or BenchConfig()
    device = backends.resolve_device(cfg.device)
    methods, skipped = available_methods(cfg)
    base = build_model(cfg)
    embeds, labels = make_inputs(base, cfg, device)
    setups = {m: prepare(m, base, cfg, device) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    faults: dict[str, list[int]] = {m: [] for m in methods}
    total = (cfg.warmup + cfg.rounds) * len(methods)
    with tqdm(total=total, desc="paca bench", disable=not progress, leave=False) as bar:
        for round_index in range(cfg.warmup + cfg.rounds):
            for method in methods:
                bar.set_postfix_str(f"round {round_index + 1}: {method}")
                model, optimizer = setups[method]
                backends.synchronize(device)
                faults_before = _minor_faults()
                start = time.perf_counter()
                train_step(model, optimizer, embeds, labels)
                backends.synchronize(device)
                if round_index >= cfg.warmup:
                    times[method].append(time.perf_counter() - start)
                    if faults_before is not None:
                        faults[method].append(_minor_faults() - faults_before)
                bar.update()
    results = {}
    for method in methods:
        model, optimizer = setups[method]
        counter = OpCounter(device.type)
        with counter:
            train_step(model, optimizer, embeds, labels)
        results[method] = {
            "step_ms": 1e3 * statistics.median(times[method]),
            "x_frozen": _median_ratio(times, method, "frozen"),
            "x_lora": _median_ratio(times, method, "lora"),
            "x_peft_paca": _median_ratio(times, method, "peft-paca"),
            "saved_bytes": saved_bytes(model, optimizer, embeds, labels),
            "page_faults": statistics.median(faults[method]) if faults[method] else None,
            "aten_ops": counter.ops,
            "aten_view_ops": counter.views,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
    del setups
    for method in methods:
        reference = results.get("frozen")
        row = results[method]
        row["saved_x_frozen"] = row["saved_bytes"] / reference["saved_bytes"] if reference else None
        lora = results.get("lora")
        row["saved_x_lora"] = row["saved_bytes"] / lora["saved_bytes"] if lora else None
        row["extra_ops"] = row["aten_ops"] - reference["aten_ops"] if reference else None
        row["memory"] = _memory_in_subprocess(method, cfg) if cfg.peak_memory else None
    report = {
        "config": dataclasses.asdict(cfg),
        "machine": {
            "torch": torch.__version__,
            "device": str(device),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "cpu": _cpu_name(),
            # whether this device computes bf16 natively, and why: a bf16 figure means little
            # without it (an AVX2-only CPU emulates bf16 GEMMs)
            "bf16_native": backends.bf16_support(device),
            "python": sys.version.split()[0],
        },
        "methods": results,
        "skipped": skipped,
        "bar": check_bar(results, quantized=cfg.quantize is not None),
    }
    write_report(report, Path(cfg.output), plot=cfg.plot)
    return report


def check_bar(results: dict, quantized: bool = False) -> dict[str, dict]:
    """The targets of the design (informative: never used to fail a run). On a quantized base
    the bar is QPaCA's: faster than QLoRA and fewer bytes saved for backward."""
    paca_row, frozen, lora = results.get("paca"), results.get("frozen"), results.get("lora")
    if not (paca_row and frozen and lora):
        return {}
    if quantized:
        checks = {
            "step time < 1.00x QLoRA": (paca_row["x_lora"], 1.0),
            "saved bytes < 1.00x QLoRA": (paca_row["saved_x_lora"], 1.0),
        }
        return {
            name: {"value": value, "limit": limit, "met": value is not None and value < limit}
            for name, (value, limit) in checks.items()
        }
    lora_extra = lora["aten_ops"] - frozen["aten_ops"]
    checks = {
        "step time <= 1.05x frozen": (paca_row["x_frozen"], 1.05),
        "step time <= 0.92x LoRA": (paca_row["x_lora"], 0.92),
        "saved bytes <= 1.01x frozen": (paca_row["saved_x_frozen"], 1.01),
        "saved bytes <= 0.80x LoRA": (paca_row["saved_x_lora"], 0.80),
        "extra ATen ops <= 0.45x LoRA's": (
            paca_row["extra_ops"] / lora_extra if lora_extra else None,
            0.45,
        ),
    }
    return {
        name: {"value": value, "limit": limit, "met": value is not None and value <= limit}
        for name, (value, limit) in checks.items()
    }


# -- output --------------------------------------------------------------------------------------


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def table(report: dict) -> str:
    """The results as a Markdown table."""
    header = (
        "| method | step ms | x frozen | x LoRA | x PEFT PaCA | saved MiB | saved x frozen "
        "| saved x LoRA | ATen ops/step | extra ops | trainable params | memory used MiB "
        "| page faults/step |"
    )
    lines = [header, "|" + "---|" * 13]
    for method, row in report["methods"].items():
        memory = row.get("memory") or {}
        if "used" in memory:
            used = f"{memory['used'] / 2**20:.0f}"
        else:
            used = memory.get("error", "not measured")
        lines.append(
            f"| {method} | {row['step_ms']:.1f} | {_fmt(row['x_frozen'], '.3f')} | "
            f"{_fmt(row['x_lora'], '.3f')} | {_fmt(row.get('x_peft_paca'), '.3f')} | "
            f"{row['saved_bytes'] / 2**20:.1f} | "
            f"{_fmt(row['saved_x_frozen'], '.3f')} | {_fmt(row['saved_x_lora'], '.3f')} | "
            f"{row['aten_ops']} | {_fmt(row['extra_ops'], 'd')} | {row['trainable_params']:,} | "
            f"{used} | {_fmt(row.get('page_faults'), '.0f')} |"
        )
    return "\n".join(lines)


def write_report(report: dict, output: Path, plot: bool = False) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    cfg = report["config"]
    base = (
        f"{cfg['quantize']} base (bitsandbytes), compute {cfg['dtype']}"
        if cfg.get("quantize")
        else cfg["dtype"]
    )
    lines = [
        f"# paca bench: {cfg['model']} hidden {cfg['hidden']}, {cfg['layers']} layers, "
        f"seq {cfg['seq']}, batch {cfg['batch']}, r {cfg['r']}, {base}, "
        f"AdamW {cfg.get('optim', 'single')}{', compiled' if cfg.get('compile') else ''} "
        f"on {report['machine']['device']}",
        "",
        f"CPU: {report['machine'].get('cpu', 'not recorded')}; torch {report['machine']['torch']}",
        "",
        table(report),
        "",
    ]
    if report["bar"]:
        lines += ["| target | value | met |", "|---|---|---|"]
        lines += [
            f"| {name} | {_fmt(c['value'], '.3f')} | {'yes' if c['met'] else 'no'} |"
            for name, c in report["bar"].items()
        ]
    for method, why in report["skipped"].items():
        lines.append(f"\nskipped {method}: {why}")
    (output / "bench.md").write_text("\n".join(lines) + "\n")
    if plot:
        plot_report(report, output / "bench.png")


def plot_report(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependency("matplotlib", "plot=True", "plot") from exc
    methods = list(report["methods"])
    rows = [report["methods"][m] for m in methods]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(methods, [r["step_ms"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("median step time (ms)")
    axes[1].bar(methods, [r["saved_bytes"] / 2**20 for r in rows], color="tab:orange")
    axes[1].set_ylabel("saved for backward (MiB)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(report["machine"]["device"] + ", torch " + report["machine"]["torch"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    # Worker mode for the per-method memory measurement:
    # python -m paca.recipes.bench --worker METHOD CONFIG_JSON
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker_cfg = BenchConfig(**json.loads(sys.argv[3]))
        print(json.dumps(measure_memory(sys.argv[2], worker_cfg)))
    else:
        sys.exit(
            "usage: python -m paca.recipes.bench --worker METHOD CONFIG_JSON (use `paca bench`)"
        )
