"""The run: data and model set up, the Trainer's loop, evaluations before and after, and the
output folder written only when everything is done (``run``)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

import paca
from paca import backends
from paca.adapters.common import atomic_file, cpu_tensors
from paca.base_layer import is_quantized
from paca.quant import bnb_config
from paca.recipes.loading import dtype_argument, load_model_class
from paca.recipes.train.config import EXAMPLES, TrainConfig
from paca.recipes.train.data import (
    CausalCollator,
    Examples,
    causal_lm_data,
    chat_data,
    classification_data,
    split_rows,
)
from paca.recipes.train.embedded import BUILTIN_DATA, DEFAULT_DATA, embedded_rows
from paca.recipes.train.errors import TrainError
from paca.recipes.train.evaluation import greedy_answers, held_out_scores, short_answers
from paca.recipes.train.files import read_rows
from paca.recipes.train.formats import detect
from paca.recipes.train.loss import answer_loss, scored_logits_only
from paca.recipes.train.model import apply_method, calibration_batches, default_model_path
from paca.recipes.train.precision import (
    ACCELERATE_NAMES,
    MIXED_PRECISION_ENV,
    accelerate_precision,
    resolve_precision,
    trained_in_fp32,
)
from paca.recipes.train.prefix import with_shared_prefix
from paca.recipes.train.processes import Processes
from paca.selection import get_strategy
from paca.targets import HEAD_NAMES


def _partial_dir(output: Path) -> Path:
    return output.parent / f".{output.name}.partial"


# written into the partial folder once everything else is in it: a run killed after that only
# has to be moved into place
COMPLETE = ".complete"


def _finish(partial: Path, output: Path) -> None:
    """Moves a complete run into place: the checkpoints out first (a kill then leaves a partial
    folder marked complete, which --resume finishes), then one rename."""
    trash = partial.parent / f".{output.name}.trash"
    shutil.rmtree(trash, ignore_errors=True)
    if (partial / "checkpoints").exists():
        os.replace(partial / "checkpoints", trash)
    os.replace(partial, output)
    (output / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(trash, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def _rows(cfg: TrainConfig) -> tuple[dict[str, list[dict]], Path]:
    """The run's rows by split, and the file they came from; the format checked."""
    if cfg.data is None and cfg.task == "causal-lm":
        raise TrainError(
            "the embedded dataset is a classification and a chat task; pass data= for causal-lm"
        )
    builtin = cfg.data is None or cfg.data in BUILTIN_DATA
    data_path = DEFAULT_DATA if builtin else Path(cfg.data)
    raw = embedded_rows() if builtin else read_rows(data_path)
    if cfg.task == "chat" and builtin:
        raw = BUILTIN_DATA[cfg.data or "docstring-module"][0](raw)
    # the format checked in the file's order, before any model or tokenizer loads
    every = [r for items in raw.values() for r in items] if isinstance(raw, dict) else raw
    detect(every, data_path, cfg.task, "text-label" if cfg.task == "classification" else cfg.format)
    return split_rows(raw, cfg.seed, data_path), data_path


def _say_cuts(datasets: dict, cfg: TrainConfig, procs: Processes) -> None:
    """How many examples ``seq_len`` cuts, and what they lose."""
    cut = sum((d.cut for d in datasets.values()), Counter())
    if not cut:
        return
    total = sum(len(d) for d in datasets.values())
    what = ", ".join(f"{n} {LOST[k]}" for k, n in cut.most_common())
    procs.say(f"seq_len {cfg.seq_len} cuts {sum(cut.values())} of {total} examples: {what}")


# what an example cut to seq_len lost (data.Examples.cut)
LOST = {
    "early turns": "lose whole early turns",
    "last user turn": "the end of their last user turn",
    "answer": "the end of their answer",
    "text": "the end of their text",
}


def run(cfg: TrainConfig) -> dict:
    """Trains and evaluates; writes everything into ``cfg.output`` at the end. Returns metrics."""
    import transformers

    output = Path(cfg.output)
    if output.exists():
        raise TrainError(f"output={output} exists; choose another folder or remove it")
    device = backends.resolve_device(cfg.device)
    if (cfg.fsdp or cfg.deepspeed) and device.type == "cpu":
        # accelerate (1.16, state.py) enables FSDP only for several accelerators and never
        # DeepSpeed once its state is a CPU one; without cpu=True it counts one process on a
        # machine without an accelerator. The Trainer would then silently run plain DDP.
        flag = "fsdp=True" if cfg.fsdp else f"deepspeed={cfg.deepspeed}"
        raise TrainError(
            f"{flag} needs GPUs or Gaudi HPUs: accelerate runs neither FSDP nor DeepSpeed on "
            "CPU processes; on CPUs drop it (torchrun alone trains with DDP)"
        )
    procs = Processes(device)
    device = procs.device
    if cfg.model and not Path(cfg.model).exists() and cfg.model.count("/") != 1:
        raise TrainError(f"model={cfg.model}: no such folder")
    rows, data_path = _rows(cfg)
    model_path = Path(cfg.model) if cfg.model else default_model_path(cfg.task)
    transformers.set_seed(cfg.seed)
    precision, why = resolve_precision(cfg.precision, device)
    launched = os.environ.get(MIXED_PRECISION_ENV, "").strip().lower()
    if launched and launched != ACCELERATE_NAMES[precision]:
        # accelerate launch --mixed_precision, or an earlier Trainer of this process
        why += f"; {MIXED_PRECISION_ENV}={launched} in the environment is not used"
    procs.say(f"precision {precision} ({why})")
    per_step = cfg.batch_size * cfg.grad_accum * procs.world
    procs.say(
        f"{per_step} examples per optimizer step: batch_size {cfg.batch_size} per process x "
        f"{procs.world} process{'es' if procs.world > 1 else ''} x grad_accum {cfg.grad_accum}"
    )
    # frozen weights in the compute dtype; what trains stays fp32 (trained_in_fp32)
    dtype = torch.bfloat16 if precision == "bf16" and cfg.method != "full" else torch.float32
    extra = dtype_argument(dtype)  # also the unquantized rest of a quantized model
    if cfg.quantize:
        try:  # the head stays unquantized and trained
            skip = list(HEAD_NAMES) if cfg.task == "classification" else None
            extra["quantization_config"] = bnb_config(cfg.quantize, dtype, skip)
        except ValueError as exc:
            raise TrainError(f"quantize={cfg.quantize}: {exc}") from None
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_path))
    # the data before the model: a bad row is reported before minutes of loading
    if cfg.task == "classification":
        labels = sorted({str(r["label"]) for items in rows.values() for r in items})
        if len(labels) < 2:
            raise TrainError(
                f"data={data_path}: classification needs at least 2 labels, found {labels}"
            )
        datasets = classification_data(rows, tokenizer, cfg, labels, data_path)
        collator = transformers.DataCollatorWithPadding(tokenizer)
    else:
        labels = None
        if tokenizer.eos_token_id is None:
            raise TrainError(f"the tokenizer of {model_path} has no eos_token; causal-lm needs one")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        make = chat_data if cfg.task == "chat" else causal_lm_data
        datasets = make(rows, tokenizer, cfg, data_path, cfg.format)
        collator = CausalCollator(tokenizer.pad_token_id)
    _say_cuts(datasets, cfg, procs)
    if cfg.task == "classification":
        model = load_model_class(str(model_path), "classification").from_pretrained(
            str(model_path),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            **extra,
        )
    else:
        model_class = load_model_class(str(model_path), "causal-lm")
        model = model_class.from_pretrained(str(model_path), **extra)
    calibration = None
    if cfg.method == "paca" and get_strategy(cfg.selection).calibrated:
        calibration = calibration_batches(datasets["train"], collator, cfg)
    model = apply_method(model, cfg, device, calibration)
    trained_in_fp32(model)
    if cfg.drop_backward:
        paca.drop_backward(model, rate=cfg.drop_backward, seed=cfg.seed, per=cfg.drop_per)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quantized = sum(is_quantized(m) for n, m in model.named_modules() if n.endswith(".base_layer"))

    partial = _partial_dir(output)
    if cfg.resume and (partial / COMPLETE).is_file():
        # killed while the finished run was being moved into place
        procs.barrier()  # every process has seen the mark before the main one moves it
        if procs.main:
            _finish(partial, output)
        procs.barrier()
        return json.loads((output / "metrics.json").read_text())
    if cfg.resume and not any((partial / "checkpoints").glob("checkpoint-*")):
        raise TrainError(f"resume=True: no checkpoint of an interrupted run in {partial}")
    if procs.main:
        if partial.exists() and not cfg.resume:
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
    procs.barrier()
    completed = diverged = False
    try:
        with accelerate_precision(precision):
            metrics = _train(
                model, tokenizer, datasets, collator, cfg, device, partial, labels, precision, procs
            )
        metrics["precision"] = {"setting": cfg.precision, "used": precision, "why": why}
        metrics["trainable_params"] = trainable
        metrics["quantized_base_layers"] = quantized  # adapted layers (PaCA or LoRA) over one
        state = paca.get_state(model)  # the calibrated selection's cost
        metrics["calibration"] = state.calibration if state is not None else None
        metrics["processes"] = procs.world
        # every process has trained and evaluated: only then does the main one write (a
        # process that died earlier leaves no output that looks complete)
        procs.barrier()
        if cfg.fsdp and not procs.main:
            # FSDP2 shards the deltas: saving gathers each whole, a collective every process
            # joins; the others' copies are thrown away
            with tempfile.TemporaryDirectory() as scratch:
                _save(model, cfg, Path(scratch) / "adapter", tokenizer)
        if procs.main:
            if (partial / "adapter").exists():  # a final save that a kill interrupted
                shutil.rmtree(partial / "adapter")
            _save(model, cfg, partial / "adapter", tokenizer)
            _write_json(partial / "metrics.json", metrics)
            settings = dataclasses.asdict(cfg) | {
                "model": str(model_path),
                "data": str(data_path),
                "lr": cfg.learning_rate,
            }
            _write_json(partial / "train_config.json", settings)
            with atomic_file(partial / COMPLETE) as tmp:
                tmp.write_text("")
            _finish(partial, output)
        procs.barrier()
        completed = True
    except Diverged:
        diverged = True  # its checkpoints would only diverge again
        raise
    finally:
        checkpoints = any((partial / "checkpoints").glob("checkpoint-*"))
        if procs.main and not completed and (diverged or not checkpoints):
            shutil.rmtree(partial, ignore_errors=True)
    return metrics


class Diverged(TrainError):
    """The loss turned NaN or inf: the run stops at that step and writes nothing."""


def _train(
    model,
    tokenizer,
    datasets,
    collator,
    cfg,
    device,
    workdir: Path,
    labels,
    precision: str,
    procs: Processes,
) -> dict:
    import transformers

    # here, not at the top: transformers' Trainer imports peft (and with it bitsandbytes), so
    # `paca --help` and the other commands stay fast and quiet
    from paca.integrations.hf import DropBackwardCallback, quantized_training
    from paca.integrations.hf import Trainer as AdapterTrainer

    per_step = cfg.batch_size * cfg.grad_accum * procs.world  # examples per optimizer step

    class _Throughput(transformers.TrainerCallback):
        """Adds examples per second since training started to each loss line."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = (time.perf_counter(), state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and "loss" in logs:
                seconds = time.perf_counter() - self.start[0]
                steps = state.global_step - self.start[1]
                logs["examples_per_s"] = round(steps * per_step / seconds, 1)

    class _StopIfDiverged(transformers.TrainerCallback):
        """Stops at the first step after which a trained tensor is NaN or inf (a NaN or inf loss
        makes its gradients, and so the update, non-finite), checked on the trained tensors
        every step: the Trainer's logged losses would hide it (``logging_nan_inf_filter``)."""

        def __init__(self):
            self.params = [p for p in model.parameters() if p.requires_grad]

        def on_step_end(self, args, state, control, **kwargs):
            finite = [p.detach().isfinite().all() for p in self.params]
            if finite and not torch.stack(finite).all():
                fix = f"lower the lr (was {cfg.learning_rate:g})"
                if precision == "bf16":
                    fix = f"try precision=fp32, or {fix}"
                raise Diverged(
                    f"training diverged at step {state.global_step}: the loss became NaN or "
                    f"inf and the trained weights are no longer finite; {fix}. Nothing was "
                    "written"
                )

    class _LastStepLogged(transformers.TrainerCallback):
        """Logs the loss at the last step too (with ``logging_first_step``, the first), so
        ``metrics.json`` has both whatever ``logging_steps`` is."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True

    steps = cfg.max_steps
    total = steps or math.ceil(cfg.epochs * math.ceil(len(datasets["train"]) / per_step))
    options: dict = {}  # TrainingArguments beyond the common ones
    if cfg.fsdp:
        # FSDP2 on each decoder layer (transformers 5 reads "version", 4.x "fsdp_version")
        layers = list(getattr(model, "_no_split_modules", None) or [])
        options["fsdp"] = "full_shard auto_wrap"
        options["fsdp_config"] = {"version": 2, "fsdp_version": 2}
        if layers:
            options["fsdp_config"]["transformer_layer_cls_to_wrap"] = layers
    if cfg.deepspeed:
        options["deepspeed"] = cfg.deepspeed
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    if cfg.group_by_length:
        # batches padded to little more than their own examples: on the default chat task
        # (79 tokens on average, a third cut at 96) a random batch of 8 was nearly always
        # padded to 96, 17% of its tokens padding
        if "train_sampling_strategy" in fields:  # transformers 5
            options["train_sampling_strategy"] = "group_by_length"
        else:
            options["group_by_length"] = True
    if "average_tokens_across_devices" in fields:
        # the loss weighted by tokens across processes (transformers 5's default; 4.x's is
        # off), so N processes train what one process with the same global batch trains
        options["average_tokens_across_devices"] = True
    args = transformers.TrainingArguments(
        **options,
        output_dir=str(workdir / "checkpoints"),
        max_steps=steps if steps > 0 else -1,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=64,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=int(0.06 * total),  # a count: warmup_ratio is gone in transformers 5
        weight_decay=0.0,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps or max(50, total // 3),
        save_total_limit=1,
        eval_strategy="no",
        report_to=[],
        seed=cfg.seed,
        bf16=precision == "bf16",  # autocast; the frozen weights are bf16 already
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        label_names=["labels"],
    )
    if cfg.gradient_checkpointing:
        # on the model rather than through TrainingArguments: transformers 5 renamed both to
        # activation_checkpointing; non-reentrant, so the inputs need no grad
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # paca's Trainer checkpoints the adapter alone (not a copy of the model)
    trainer_class = AdapterTrainer if cfg.method == "paca" else transformers.Trainer
    loss_options = {}
    answer_logits = not (cfg.fsdp or cfg.deepspeed or cfg.drop_sensitivity)
    # the shared prompt prefix once per batch (prefix.py): one process (DDP's reducer expects
    # one forward per backward), no activation checkpointing (it turns the cache off) and no
    # DropBP (not tried with it)
    share_prefix = procs.world == 1 and not (cfg.gradient_checkpointing or cfg.drop_backward)
    if labels is None and answer_logits and not backends.static_shapes(device):
        # a causal LM computes logits at its labelled positions only (loss.py); left to the
        # model's own loss under FSDP and DeepSpeed, whose wrapping this was not tried with,
        # when DropBP measures sensitivities (it reruns a training forward's inputs, labels
        # included, and the model's own loss), and on a device that compiles a graph per shape
        # (Gaudi): the labelled positions' count changes from batch to batch
        trainer_class = _answer_logits_only(trainer_class, share_prefix)
        loss_options["compute_loss_func"] = answer_loss
    with quantized_training(model):
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=datasets["train"],
            data_collator=collator,
            **loss_options,
        )
    for wanted, engine, enabled in (
        (cfg.fsdp, "fsdp", "is_fsdp_enabled"),
        (cfg.deepspeed, "deepspeed", "is_deepspeed_enabled"),
    ):
        if wanted and not getattr(trainer, enabled, False):
            raise TrainError(
                f"the Trainer did not enable {engine} here (accelerate decides from the "
                "launcher and the device); start the run with torchrun or accelerate launch on "
                "GPUs or HPUs"
            )
    # ahead of the progress bar's callback, so the loss line it prints carries the throughput
    trainer.callback_handler.callbacks.insert(0, _Throughput())
    trainer.add_callback(_LastStepLogged())
    trainer.add_callback(_StopIfDiverged())
    if cfg.drop_backward:
        at = 0.1 if cfg.drop_sensitivity else None
        trainer.add_callback(DropBackwardCallback(sensitivity_at=at))
    evaluate = {s: d for s, d in datasets.items() if s != "train" and len(d)}
    if cfg.task == "chat":
        # a fixed sample of the held-out split (eval_examples)
        held_out = cfg.eval_split if cfg.eval_split in evaluate else next(iter(evaluate), None)
        evaluate = {}
        if held_out is not None:
            items = list(datasets[held_out].items)
            random.Random(0).shuffle(items)  # the same sample whatever the run's seed
            evaluate[held_out] = Examples(items[: cfg.eval_examples or len(items)], answers=True)
    exact = {split: d.answers and short_answers(d) for split, d in evaluate.items()}
    # the held-out pass runs shared prefixes once too, except on sharded models (not tried) and
    # on a device that compiles a graph per shape
    share_held_out = not (cfg.fsdp or cfg.deepspeed or backends.static_shapes(device))
    generations: dict[str, dict[str, list[str]]] = {}  # when -> split -> greedy answers
    evaluation_seconds: dict[str, float] = {}

    def scores(when: str) -> dict:
        result = {}
        started = time.perf_counter()
        for split, dataset in evaluate.items():
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                found = held_out_scores(
                    model, dataset, collator, procs, bool(labels), share_prefix=share_held_out
                )
                result[split] = {"loss": found["loss"]}
                if labels:
                    result[split]["accuracy"] = found["accuracy"]
                    continue
                if found["accuracy"] is not None:  # next-token accuracy on the labelled tokens
                    result[split]["token_accuracy"] = found["accuracy"]
                if exact[split]:
                    result[split]["exact_match"] = found["exact_match"]
                else:
                    result[split]["perplexity"] = math.exp(min(found["loss"], 50))
                if cfg.task == "chat" and split not in generations.get(when, {}):
                    # a few greedy answers to show beside the references
                    shown = dataset.items[:EXAMPLES]
                    generations.setdefault(when, {})[split] = greedy_answers(
                        model, tokenizer, shown
                    )
        evaluation_seconds[when] = round(time.perf_counter() - started, 2)
        return result

    before = scores("before") if cfg.eval_before else {}
    checkpoint = None
    if cfg.resume:
        checkpoint = transformers.trainer_utils.get_last_checkpoint(args.output_dir)
    state_file = Path(checkpoint or "") / "trainer_state.json"
    started = time.perf_counter()
    if checkpoint and steps > 0 and json.loads(state_file.read_text())["global_step"] >= steps:
        # The run was killed after its last step was checkpointed. The Trainer, resumed from
        # there, would train one step more (it checks max_steps only after a step); load it.
        trainer._load_from_checkpoint(checkpoint)
        trainer.state = transformers.TrainerState.load_from_json(str(state_file))
        train_metrics = {}
    else:
        train_metrics = trainer.train(resume_from_checkpoint=checkpoint).metrics
    seconds = time.perf_counter() - started
    # what the Trainer made of the model: DDP, FSDP2 (DTensor parameters), DeepSpeed
    sharded = sorted({type(p).__name__ for p in model.parameters()} - {"Parameter", "Tensor"})
    engine = {
        "wrapper": type(trainer.model_wrapped).__name__,
        "distributed_parameters": sharded,
    }
    after = scores("after")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    controller = paca.dropbp.get(model)
    drop = None
    if controller is not None:
        drop = {"rate": controller.rate, "per": controller.per}
        drop["rates"] = {b.name: b.rate for b in controller.branches}
    return {
        "method": cfg.method,
        "engine": engine,
        "drop_backward": drop,
        "before": before,
        "after": after,
        "evaluation_seconds": evaluation_seconds,  # per pass: scores and the shown answers
        "train": {
            "steps": trainer.state.global_step,
            "seconds": seconds,
            "seconds_per_step": seconds / max(trainer.state.global_step, 1),
            "examples_per_s": train_metrics.get("train_samples_per_second"),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
        },
        "labels": labels,
        "examples": [
            {"question": e["question"], "answer": e["answer"]}
            | {when: shown[split][i] for when, shown in generations.items()}
            for split, dataset in evaluate.items()
            for i, e in enumerate(dataset.items[:EXAMPLES])
        ]
        if generations
        else [],
    }


def _answer_logits_only(trainer_class, share_prefix: bool):
    """``trainer_class`` whose training forward computes logits at the labelled positions only
    (``loss.scored_logits_only``; its ``compute_loss_func`` must be ``loss.answer_loss``) and,
    with ``share_prefix``, runs a batch's shared prompt prefix once (``prefix``)."""

    class AnswerLogitsTrainer(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if share_prefix:  # under the autocast accelerate gives the model's own forward
                with self.accelerator.autocast():
                    inputs = with_shared_prefix(self.model, inputs)
            # the Trainer takes the labels out of the inputs before the forward: select first,
            # and hand it a copy (callbacks such as DropBP's sensitivity reuse the batch)
            with scored_logits_only(self.model, inputs["labels"]):
                return super().compute_loss(model, dict(inputs), return_outputs, num_items_in_batch)

    AnswerLogitsTrainer.__name__ = trainer_class.__name__
    return AnswerLogitsTrainer


def _save(model, cfg: TrainConfig, path: Path, tokenizer) -> None:
    if cfg.method == "paca":
        paca.save_adapter(model, path)
        # the head class and label names, so `paca merge` rebuilds the same model (onto the
        # floating-point base: the quantization settings are in train_config.json)
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        for quantized_only in ("quantization_config", "_pre_quantization_dtype"):
            if quantized_only in vars(config):  # the second is a torch.dtype (transformers 4.x)
                delattr(config, quantized_only)
        config.save_pretrained(path)
    elif cfg.method == "lora":
        model.save_pretrained(path)
    elif cfg.method == "full":
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    else:
        path.mkdir(parents=True)
        state = {n: p for n, p in model.named_parameters() if p.requires_grad}
        save_file(cpu_tensors(state), str(path / "head.safetensors"))
