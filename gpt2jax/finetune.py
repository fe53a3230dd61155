"""Fine-tune a GPT-2, or train one from a config, on text files: `python -m gpt2jax.finetune ...`.

    # fine-tune a downloaded GPT-2 on a text file
    python -m gpt2jax.finetune --model checkpoints/117M --data corpus.txt --out checkpoints/mine --steps 1000
    # train from scratch: a preset and/or overrides, and a tokenizer folder (vocab.json + merges.txt)
    python -m gpt2jax.finetune --config n_layer=4,n_embd=256,n_head=8,n_ctx=256 --tokenizer tok/ \\
        --data docs/ --out checkpoints/small --steps 2000 --lr 1e-3

Rerunning a command whose --out folder holds a train state resumes it (model, tokenizer, optimizer state,
step and data position come from there). Ctrl-C saves a checkpoint first. The output folder is a normal
checkpoint: `gpt2jax.load(out)`, the server and transformers' `from_pretrained` all read it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

import numpy as np

from gpt2jax import data
from gpt2jax.checkpoint import load_params
from gpt2jax.config import GPT2Config, preset
from gpt2jax.lm import DTYPES, resolve_checkpoint
from gpt2jax.tokenizer import GPT2Tokenizer
from gpt2jax.train import train
from gpt2jax.train_state import STATE_FILE, ResumeError
from gpt2jax.train_step import TrainConfig, init_from_scratch


def parse_config(spec: str, tokenizer: GPT2Tokenizer) -> GPT2Config:
    """A config from "124M", "n_layer=4,n_embd=256" or "124M,n_layer=6" (a preset, then overrides).

    n_vocab and eos_token_id come from the tokenizer unless the spec sets them.
    """
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    base = GPT2Config()
    if parts and "=" not in parts[0]:
        base = preset(parts.pop(0))
    fields = {f.name: f.type for f in dataclasses.fields(GPT2Config)}
    overrides: dict[str, int | float] = {
        "n_vocab": tokenizer.vocab_size,
        "eos_token_id": tokenizer.eos_token_id,
    }
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ValueError(f"--config: {part!r} is not <field>=<value> with a field of {', '.join(fields)}")
        overrides[key] = float(value) if fields[key] in ("float", float) else int(value)
    return dataclasses.replace(base, **overrides)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m gpt2jax.finetune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    start = ap.add_mutually_exclusive_group()
    start.add_argument("--model", help="checkpoint folder (or name under ./checkpoints) to fine-tune")
    start.add_argument("--config", help="train from scratch: preset and/or field=value list")
    ap.add_argument("--tokenizer", help="tokenizer folder for --config (default: the --model folder)")
    ap.add_argument("--data", nargs="+", required=True, help="text files and/or folders of them")
    ap.add_argument("--eval-data", nargs="+", help="held-out text (default: --holdout of --data)")
    ap.add_argument("--holdout", type=float, default=0.05, help="fraction of --data held out, by document")
    ap.add_argument("--out", required=True, help="output folder: checkpoints and train state")
    ap.add_argument("--allow-pickle", action="store_true", help="permit loading pytorch_model.bin")
    d = TrainConfig()
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    ap.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence (0: n_ctx)")
    ap.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    ap.add_argument("--min-lr", type=float, default=d.min_lr, help="learning rate after cosine decay")
    ap.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup steps")
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--clip", type=float, default=d.clip, help="max global gradient norm (0: off)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype, help="compute dtype")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--eval-every", type=int, default=d.eval_every)
    ap.add_argument("--eval-batches", type=int, default=d.eval_batches)
    ap.add_argument("--save-every", type=int, default=d.save_every)
    ap.add_argument("--sample-every", type=int, default=d.sample_every)
    ap.add_argument(
        "--sample-prompt", action="append", default=[], help="repeatable (default: one of --data)"
    )
    ap.add_argument("--sample-tokens", type=int, default=48)
    args = ap.parse_args(argv)
    args.dtype = "bfloat16" if DTYPES[args.dtype] == DTYPES["bfloat16"] else "float32"
    return args


def train_config(args: argparse.Namespace) -> TrainConfig:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    return TrainConfig(**{n: getattr(args, n) for n in names})


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out
    if os.path.isfile(os.path.join(out, STATE_FILE)):
        # Resuming: train() restores the params and optimizer state; the model's shape and tokenizer are here.
        print(f"resuming from {out}", file=sys.stderr)
        config, params, tokenizer_dir = GPT2Config.from_dir(out), None, out
    elif args.model:
        tokenizer_dir = resolve_checkpoint(args.model)
        config, params = load_params(tokenizer_dir, allow_pickle=args.allow_pickle)
    elif args.config:
        if not args.tokenizer:
            sys.exit("--config needs --tokenizer (a folder with vocab.json + merges.txt)")
        tokenizer_dir = args.tokenizer
        config = parse_config(args.config, GPT2Tokenizer.from_dir(tokenizer_dir))
        params = init_from_scratch(config, args.seed)
    else:
        sys.exit("say what to train: --model <checkpoint> or --config <spec> --tokenizer <folder>")
    tokenizer = GPT2Tokenizer.from_dir(tokenizer_dir)
    if tokenizer.vocab_size > config.n_vocab:
        sys.exit(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.n_vocab}")

    docs = data.read_documents(args.data)
    tokens = data.tokenize_documents(docs, tokenizer)
    if args.eval_data:
        train_tokens = np.concatenate(tokens)
        heldout = np.concatenate(data.tokenize_documents(data.read_documents(args.eval_data), tokenizer))
    else:
        train_tokens, heldout = data.split_heldout(tokens, args.holdout, args.seed)
    print(
        f"{config.num_params():,} parameters; {len(docs)} documents, {len(train_tokens):,} training tokens, "
        f"{len(heldout):,} held out",
        file=sys.stderr,
    )
    if params is None:  # resuming: any params of the right shapes do; train() replaces them
        params = init_from_scratch(config, 0)
    prompts = args.sample_prompt or [" ".join(docs[0].split()[:4])]
    try:
        result = train(
            config,
            params,
            train_tokens,
            heldout,
            train_config(args),
            out_dir=out,
            tokenizer_dir=tokenizer_dir,
            sample_prompts=prompts,
            sample_tokens=args.sample_tokens,
        )
    except ResumeError as e:
        print(f"cannot resume: {e}", file=sys.stderr)
        return 2
    print(f"step {result.step}: saved to {out}", file=sys.stderr)
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
