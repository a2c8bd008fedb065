"""Do serving engines answer as paca does? Used by ci/serving.sh; each mode runs in the
environment that has its engine (vLLM and llama.cpp each live in a virtual environment of
their own, without paca), so only the reference mode imports paca.

    # paca's greedy answers (token ids) to held-out prompts of the default task, in fp32
    python scripts/serving_check.py reference --adapter RUN/adapter --n 64 --out ref.json
    # the same prompts, as token ids, answered by an engine; prints and writes the agreement
    python scripts/serving_check.py vllm --ref ref.json --base FOLDER --lora LORA_FOLDER
    python scripts/serving_check.py llama --ref ref.json --gguf M.gguf [--lora A.gguf]

Prompts go in as token ids (no engine-side chat template or tokenizer in between), 8 new
tokens, greedy; an answer is its tokens up to the first end-of-sequence. "identical" counts
answers with the same tokens as paca's; "exact match" scores the decoded answer against the
task's reference answer, as `paca train` does.

Both sides compute in one precision, named in every result: paca's answers come from the base
loaded in fp32 (``--precision fp32``, the default), as vLLM (``--dtype float32``) and llama.cpp
(an F32 GGUF; Q8_0/Q4_1 files are compared with a bar of their own) run the exports. Left to
itself, ``paca.recipes.generate.load`` keeps the bf16 SmolLM2 checkpoint in bf16 on a CPU with
native bf16 (AVX512-BF16, AMX), where greedy near-ties then flip against an fp32 engine: 61/64
there, against 64/64 held to one precision.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

NEW_TOKENS = 8
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}


def _cut(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def reference_model(adapter: str, base: str | None, precision: str):
    """``(model, tokenizer)``: the base with the adapter, computing in ``precision`` whatever
    the CPU (never ``runnable_dtype``'s choice, which depends on it)."""
    import torch

    from paca.recipes import generate

    return generate.load(adapter, base, dtype=getattr(torch, PRECISIONS[precision]))


def reference(args) -> dict:
    import torch

    from paca.recipes import generate, train

    test = [r for r in train.read_rows(train.DEFAULT_DATA) if r.get("split") == "test"]
    rows = train.chat_rows(test)[: args.n]
    model, tokenizer = reference_model(args.adapter, args.base, args.precision)
    dtype = next(model.parameters()).dtype
    assert dtype == getattr(torch, PRECISIONS[args.precision]), dtype
    prompts, answers, texts = [], [], []
    with torch.no_grad():
        for row in rows:
            ids = generate.prompt_ids(tokenizer, row["prompt"])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
            new = _cut(out[0, ids.shape[1] :].tolist(), tokenizer.eos_token_id)
            prompts.append(ids[0].tolist())
            answers.append(new)
            texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return {
        "precision": str(dtype).removeprefix("torch."),
        "eos": tokenizer.eos_token_id,
        "prompts": prompts,
        "answers": answers,
        "texts": texts,
        "expected": [str(r["response"]) for r in rows],
    }


def _hits(texts: list[str], expected: list[str]) -> int:
    """Answers equal to the reference answer after stripping whitespace (exact match)."""
    return sum(t.strip() == e.strip() for t, e in zip(texts, expected, strict=True))


def _agreement(ref: dict, answers: list[list[int]], texts: list[str], engine: str) -> dict:
    same = sum(a == b for a, b in zip(answers, ref["answers"], strict=True))
    hits = _hits(texts, ref["expected"])
    paca_hits = _hits(ref["texts"], ref["expected"])
    n = len(ref["answers"])
    return {
        "engine": engine,
        "paca_precision": ref.get("precision"),
        "prompts": n,
        "identical": same,
        "exact_match": hits / n,
        "paca_exact_match": paca_hits / n,
        "differing": [
            {"paca": ref["texts"][i], engine: texts[i]}
            for i in range(n)
            if answers[i] != ref["answers"][i]
        ][:5],
    }


def vllm(args, ref: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    started = time.perf_counter()
    llm = LLM(
        model=args.base,
        enable_lora=True,
        max_lora_rank=args.max_lora_rank,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=2048,
        # on CPUs this is the share of host memory vLLM reserves (its KV cache): 0.92 by
        # default, more than a shared 2-core machine has free
        gpu_memory_utilization=args.memory,
    )
    loaded = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    requests = [{"prompt_token_ids": ids} for ids in ref["prompts"]]
    started = time.perf_counter()
    outs = llm.generate(requests, params, lora_request=LoRARequest("paca", 1, args.lora))
    seconds = time.perf_counter() - started
    answers = [_cut(list(o.outputs[0].token_ids), ref["eos"]) for o in outs]
    texts = [o.outputs[0].text for o in outs]
    result = _agreement(ref, answers, texts, "vllm")
    return result | {
        "precision": args.dtype,
        "load_seconds": round(loaded, 1),
        "answer_seconds": round(seconds, 1),
    }


def llama(args, ref: dict) -> dict:
    from llama_cpp import Llama

    started = time.perf_counter()
    extra = {"lora_path": args.lora} if args.lora else {}
    llm = Llama(model_path=args.gguf, n_ctx=2048, n_threads=2, verbose=False, **extra)
    loaded = time.perf_counter() - started
    answers, texts = [], []
    started = time.perf_counter()
    for ids in ref["prompts"]:
        llm.reset()
        new = []
        for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            if token == ref["eos"] or token == llm.token_eos():
                break
            new.append(token)
            if len(new) == NEW_TOKENS:
                break
        answers.append(new)
        texts.append(llm.detokenize(new).decode("utf-8", errors="replace"))
    seconds = time.perf_counter() - started
    name = Path(args.gguf).name + (f" + {Path(args.lora).name}" if args.lora else "")
    result = _agreement(ref, answers, texts, "llama.cpp")
    return result | {
        "model": name,
        "load_seconds": round(loaded, 1),
        "answer_seconds": round(seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("reference")
    p.add_argument("--adapter", required=True)
    p.add_argument("--base", default=None)
    p.add_argument("--n", type=int, default=64)
    p.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default="fp32",
        help="what paca computes in (the engines' precision: fp32)",
    )
    p.add_argument("--out", required=True)
    p = sub.add_parser("vllm")
    p.add_argument("--ref", required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--lora", required=True)
    p.add_argument("--max-lora-rank", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(PRECISIONS.values()), default="float32")
    p.add_argument("--memory", type=float, default=0.2, help="vLLM's gpu_memory_utilization")
    p.add_argument("--out", default=None)
    p = sub.add_parser("llama")
    p.add_argument("--ref", required=True)
    p.add_argument("--gguf", required=True)
    p.add_argument("--lora", default=None)
    p.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.mode == "reference":
        result = reference(args)
        Path(args.out).write_text(json.dumps(result) + "\n")
        hits = _hits(result["texts"], result["expected"])
        print(
            f"paca ({result['precision']}): {len(result['answers'])} answers, "
            f"exact match {hits}/{len(result['texts'])}"
        )
        return 0
    ref = json.loads(Path(args.ref).read_text())
    result = vllm(args, ref) if args.mode == "vllm" else llama(args, ref)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1), file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
