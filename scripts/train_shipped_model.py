"""Trains the shipped model, checkpoints/pydoc-tiny, from scratch: one seeded, reproducible run on the CPU.

    python scripts/train_shipped_model.py                 # ~20 minutes on 2 shared CPU cores
    python scripts/train_shipped_model.py --steps 50 --out /tmp/pilot   # a quick trial

The corpus is the Python documentation that ships with CPython (`pydoc_data.topics`, PSF license), one
document per topic. About 5% of it, by topic, is held out; the byte-level BPE is trained on the rest and
saved in GPT-2's file format. Training state goes to --work (rerunning resumes there); the finished model,
its tokenizer, training.json (settings, held-out topics, losses, time) and a README.md go to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt2jax import data  # noqa: E402
from gpt2jax.config import GPT2Config  # noqa: E402
from gpt2jax.train import train  # noqa: E402
from gpt2jax.train_step import TrainConfig, init_from_scratch  # noqa: E402

SEED = 1234
VOCAB = 4096  # including <|endoftext|>, the last id as in GPT-2
HELDOUT_FRACTION = 0.05
CONFIG = GPT2Config(n_vocab=VOCAB, n_ctx=256, n_embd=256, n_head=8, n_layer=4, eos_token_id=VOCAB - 1)
TRAIN = TrainConfig(
    steps=600,
    batch_size=8,
    lr=1e-3,
    min_lr=1e-4,
    warmup=50,
    weight_decay=0.1,
    seed=SEED,
    eval_every=50,
    eval_batches=4,
    sample_every=200,
    save_every=100,
)
PROMPTS = ("The", "The for statement", "Class definitions")
MODEL_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")


def corpus() -> dict[str, str]:
    """The Python documentation topics that ship with CPython, by topic name, in a stable order."""
    import pydoc_data.topics

    return {k: pydoc_data.topics.topics[k].strip() for k in sorted(pydoc_data.topics.topics)}


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int) -> Path:
    """A GPT-2-style byte-level BPE on `texts`, saved as vocab.json + merges.txt; <|endoftext|> last."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size - 1, min_frequency=2, show_progress=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_model(str(out_dir))
    vocab = json.loads((out_dir / "vocab.json").read_text(encoding="utf-8"))
    vocab[data.EOS_TOKEN] = len(vocab)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "checkpoints" / "pydoc-tiny"))
    ap.add_argument("--work", default=str(ROOT / "build" / "pydoc-tiny-train"))
    ap.add_argument(
        "--steps", type=int, default=TRAIN.steps, help="for trials; the shipped model uses the default"
    )
    args = ap.parse_args()
    tc = dataclasses.replace(TRAIN, steps=args.steps)
    work, out = Path(args.work), Path(args.out)

    import gpt2jax
    from gpt2jax.tokenizer import GPT2Tokenizer

    topics = corpus()
    names = list(topics)
    held = set(data.choose_heldout([len(topics[k]) for k in names], HELDOUT_FRACTION, SEED))
    train_names = [k for i, k in enumerate(names) if i not in held]
    heldout_names = [k for i, k in enumerate(names) if i in held]
    tok_dir = train_tokenizer([topics[k] for k in train_names], work / "tokenizer", VOCAB)
    tokenizer = GPT2Tokenizer.from_dir(tok_dir)
    assert tokenizer.vocab_size == VOCAB and tokenizer.eos_token_id == CONFIG.eos_token_id
    train_tokens = np.concatenate(data.tokenize_documents([topics[k] for k in train_names], tokenizer))
    heldout_tokens = np.concatenate(data.tokenize_documents([topics[k] for k in heldout_names], tokenizer))
    print(f"{len(train_names)} topics, {len(train_tokens):,} tokens for training; ", end="")
    print(f"{len(heldout_names)} topics, {len(heldout_tokens):,} tokens held out: {', '.join(heldout_names)}")
    print(f"model: {CONFIG}, {CONFIG.num_params():,} parameters")

    t0 = time.time()
    result = train(
        CONFIG,
        init_from_scratch(CONFIG, SEED),
        train_tokens,
        heldout_tokens,
        tc,
        out_dir=work / "run",
        tokenizer_dir=tok_dir,
        sample_prompts=PROMPTS,
    )
    train_seconds = time.time() - t0
    if result.interrupted:
        sys.exit("interrupted; rerun the same command to resume")

    # Final numbers over the whole held-out split, not just the periodic evaluation's slice.
    from gpt2jax.train_step import heldout_loss, make_eval_step, make_mesh

    seq_len = tc.seq_len_for(CONFIG)
    windows = data.eval_windows(heldout_tokens, seq_len, 1 << 30)
    loss = heldout_loss(
        make_eval_step(CONFIG, np.float32, make_mesh()), result.params, windows, tc.batch_size
    )
    unigram = data.unigram_loss(train_tokens, windows[:, 1:], VOCAB)

    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copyfile(work / "run" / name, out / name)
    model = gpt2jax.load(out)
    greedy = {p: model.generate(p, max_tokens=60, temperature=0)[0] for p in PROMPTS}
    sampled = {p: model.generate(p, max_tokens=60, temperature=0.8, top_k=40, seed=SEED)[0] for p in PROMPTS}
    report = {
        "config": dataclasses.asdict(CONFIG),
        "parameters": CONFIG.num_params(),
        "train_config": dataclasses.asdict(tc),
        "corpus": "pydoc_data.topics (CPython's documentation topics, PSF license)",
        "python": platform.python_version(),
        "train_topics": len(train_names),
        "train_tokens": int(len(train_tokens)),
        "heldout_topics": heldout_names,
        "heldout_tokens_scored": int(windows[:, 1:].size),
        "heldout_loss": loss,
        "unigram_loss": unigram,
        "epochs": tc.steps * tc.batch_size * tc.grad_accum * seq_len / len(train_tokens),
        "train_seconds_this_run": round(train_seconds),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), JAX on CPU",
        "samples_greedy": greedy,
        "samples_t0.8_top_k40": sampled,
    }
    (out / "training.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "README.md").write_text(model_card(report), encoding="utf-8")
    print(json.dumps(report, indent=2, ensure_ascii=False))


def model_card(r: dict) -> str:
    """The README.md of the model folder, from training.json's contents."""
    c, t = r["config"], r["train_config"]
    sample = r["samples_t0.8_top_k40"]["The for statement"]
    return f"""# pydoc-tiny

A small GPT-2 trained from scratch by this project, so that a fresh clone has a model to serve with no
download. It writes text that looks like the Python documentation; it knows little else. For real GPT-2
weights run `python3 download_model.py 117M` (or 345M, 774M, 1558M).

- Architecture: GPT-2, {c["n_layer"]} layers, {c["n_embd"]} wide, {c["n_head"]} heads, {c["n_ctx"]}-token context, {c["n_vocab"]}-token byte-level BPE vocabulary (`<|endoftext|>` = {c["eos_token_id"]}): {r["parameters"]:,} parameters, float32.
- Corpus: {r["corpus"]} from Python {r["python"]}: {r["train_topics"]} topics ({r["train_tokens"]:,} tokens) for training, {len(r["heldout_topics"])} topics held out ({", ".join(r["heldout_topics"])}). The tokenizer was trained on the training topics only.
- Training: {t["steps"]} steps of {t["batch_size"]} x {c["n_ctx"]} tokens (~{r["epochs"]:.1f} epochs), AdamW (lr {t["lr"]:g} to {t["min_lr"]:g}, cosine, {t["warmup"]} warmup steps, weight decay {t["weight_decay"]:g}, clip {t["clip"]:g}), seed {t["seed"]}; {r["train_seconds_this_run"] / 60:.0f} minutes on {r["machine"]}.
- Held-out loss: {r["heldout_loss"]:.3f} nats/token, against {r["unigram_loss"]:.3f} for a unigram model (add-one smoothed token frequencies of the training topics) on the same {r["heldout_tokens_scored"]:,} tokens.

Sample (`temperature=0.8, top_k=40`, prompt "The for statement"):

```
The for statement{sample}
```

Reproduce with `python scripts/train_shipped_model.py`; `training.json` has every setting and number.
"""


if __name__ == "__main__":
    main()
