#!/usr/bin/env python
"""Train DSI's built-in default model pair (target + distilled drafter) from scratch on the CPU.

Corpus: the *.py sources of the running Python's standard library (read at training time, never
copied), minus ``site-packages`` and test directories, sorted by path; every ``--heldout-every``-th
file is held out for evaluation. Pipeline:

1. a byte-level BPE tokenizer (``tokenizers``) with ``<|endoftext|>`` as EOS/BOS/PAD;
2. the target: a small LlamaForCausalLM trained with next-token cross-entropy;
3. the drafter: a much smaller LlamaForCausalLM distilled from the target (forward KL to the
   target's softmax at every position of the corpus).

Both are saved as complete HuggingFace directories (config, generation config, bf16 safetensors,
tokenizer) under ``--out`` (``target/`` and ``drafter/``). Intermediate fp32 checkpoints go to
``--work-dir`` so a usable model survives an interrupted run.

Example (the command that produced the shipped pair is in dsi/pretrained/README.md)::

    HF_HUB_OFFLINE=1 python scripts/train_default_pair.py --out dsi/pretrained --seed 0 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import random
import sys
import sysconfig
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dsi.bpe import EOS_TOKEN  # noqa: E402 - shared with the tiny test pairs


# ----------------------------------------------------------------------------------------------
# corpus
# ----------------------------------------------------------------------------------------------
def stdlib_files() -> list[pathlib.Path]:
    """All standard-library *.py files, sorted, without site-packages and test directories."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in ("site-packages", "dist-packages", "test", "tests", "__pycache__") for p in parts):
            continue
        if any(p.startswith("idle_test") for p in parts):
            continue
        out.append(path)
    return out


def read_text(path: pathlib.Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return text if text.strip() else None


def split_corpus(heldout_every: int) -> tuple[list[str], list[str]]:
    """Deterministic split: file i (in sorted order, unreadable ones skipped) is held out when
    i % heldout_every == heldout_every // 2."""
    train, heldout = [], []
    i = 0
    for path in stdlib_files():
        text = read_text(path)
        if text is None:
            continue
        (heldout if i % heldout_every == heldout_every // 2 else train).append(text)
        i += 1
    return train, heldout


def encode_stream(tok, texts: list[str]):
    """Concatenate the token ids of the texts, each followed by EOS, into one 1-D int64 tensor."""
    import torch

    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    ids: list[int] = []
    for enc in tok.backend_tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int):
    from dsi.bpe import train_bpe_tokenizer

    return train_bpe_tokenizer(texts, vocab_size)


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
def llama_config(vocab: int, eos: int, hidden: int, layers: int, heads: int, inter: int, max_pos: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_pos,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        initializer_range=0.02,
    )


def export(model, tok, path: pathlib.Path, eos: int) -> None:
    """Save a complete HF directory: bf16 safetensors + config + generation config + tokenizer."""
    import copy

    import torch
    from transformers import GenerationConfig

    path.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).to(torch.bfloat16).eval()
    m.generation_config = GenerationConfig(
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=False, max_new_tokens=128
    )
    m.save_pretrained(str(path))
    tok.save_pretrained(str(path))


def batches(stream, batch: int, seq: int, gen):
    """Endless random windows of seq+1 tokens from the stream."""
    import torch

    hi = len(stream) - seq - 1
    while True:
        starts = torch.randint(0, hi, (batch,), generator=gen)
        yield torch.stack([stream[s : s + seq + 1] for s in starts.tolist()])


def heldout_chunks(stream, seq: int, max_chunks: int):
    n = min(max_chunks, (len(stream) - 1) // seq)
    return [stream[i * seq : i * seq + seq + 1] for i in range(n)]


def evaluate_loss(model, chunks, batch: int = 16) -> float:
    import torch
    import torch.nn.functional as F

    model.eval()
    tot, cnt = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(chunks), batch):
            x = torch.stack(chunks[i : i + batch])
            logits = model(x[:, :-1]).logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum")
            tot += loss.item()
            cnt += x[:, 1:].numel()
    model.train()
    return tot / cnt


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def make_opt(model, lr: float, wd: float):
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )


def train_loop(name, model, steps, lr, warmup, loss_fn, data, ckpt_dir, ckpt_every, log):
    import torch
    from tqdm import tqdm

    opt = make_opt(model, lr, 0.1)
    model.train()
    t0 = time.time()
    ema = None
    bar = tqdm(range(steps), desc=f"train {name}", mininterval=5.0, file=sys.stderr)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        x = next(data)
        loss = loss_fn(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{(step + 1) * x[:, :-1].numel() / (time.time() - t0):.0f}",
                        refresh=False)
        if ckpt_every and (step + 1) % ckpt_every == 0 and step + 1 < steps:
            model.save_pretrained(str(ckpt_dir / f"{name}_ckpt"))
            log(f"{name}: step {step + 1}/{steps} loss(ema) {ema:.4f} elapsed {time.time() - t0:.0f}s")
    return time.time() - t0


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("dsi/pretrained"),
                   help="output directory; target/ and drafter/ are written under it")
    p.add_argument("--work-dir", type=pathlib.Path, default=pathlib.Path("/tmp/dsi_default_pair"),
                   help="scratch directory for fp32 checkpoints")
    p.add_argument("--seed", type=int, default=0, help="seed for init, batches and everything else")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (and tokenizer threads)")
    p.add_argument("--stages", default="tokenizer,target,drafter",
                   help="comma list of stages to run; a skipped stage loads its result from --out")
    p.add_argument("--heldout-every", type=int, default=25, help="hold out one file in this many")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length")
    p.add_argument("--max-position-embeddings", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (both models)")
    p.add_argument("--target-hidden", type=int, default=256)
    p.add_argument("--target-layers", type=int, default=6)
    p.add_argument("--target-heads", type=int, default=4)
    p.add_argument("--target-intermediate", type=int, default=768)
    p.add_argument("--target-steps", type=int, default=1600)
    p.add_argument("--target-lr", type=float, default=2e-3)
    p.add_argument("--drafter-hidden", type=int, default=96)
    p.add_argument("--drafter-layers", type=int, default=1)
    p.add_argument("--drafter-heads", type=int, default=2)
    p.add_argument("--drafter-intermediate", type=int, default=256)
    p.add_argument("--drafter-steps", type=int, default=2400)
    p.add_argument("--drafter-lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps (both models)")
    p.add_argument("--ckpt-every", type=int, default=200, help="save an fp32 checkpoint every N steps")
    p.add_argument("--eval-chunks", type=int, default=256, help="held-out chunks of --seq-len for the loss")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    args.work_dir.mkdir(parents=True, exist_ok=True)
    tdir, ddir = args.out / "target", args.out / "drafter"
    report: dict = {"seed": args.seed, "threads": args.threads, "argv": sys.argv[1:]}

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_all = time.time()
    train_texts, heldout_texts = split_corpus(args.heldout_every)
    log(f"corpus: {len(train_texts)} train files ({sum(map(len, train_texts)) / 1e6:.1f} MB), "
        f"{len(heldout_texts)} held-out files ({sum(map(len, heldout_texts)) / 1e6:.2f} MB)")

    # 1. tokenizer
    if "tokenizer" in stages:
        t0 = time.time()
        tok = train_tokenizer(train_texts, args.vocab_size)
        for d in (tdir, ddir):
            d.mkdir(parents=True, exist_ok=True)
            tok.save_pretrained(str(d))
        report["tokenizer_s"] = round(time.time() - t0, 1)
        log(f"tokenizer: vocab {len(tok)} trained in {report['tokenizer_s']}s")
    else:
        tok = AutoTokenizer.from_pretrained(str(tdir))
    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    vocab = len(tok)

    train_ids = encode_stream(tok, train_texts)
    held_ids = encode_stream(tok, heldout_texts)
    chunks = heldout_chunks(held_ids, args.seq_len, args.eval_chunks)
    log(f"tokens: train {len(train_ids)}, held-out {len(held_ids)} (eval on {len(chunks)} x {args.seq_len})")
    report["train_tokens"] = len(train_ids)

    # 2. target
    if "target" in stages:
        cfg = llama_config(vocab, eos, args.target_hidden, args.target_layers, args.target_heads,
                           args.target_intermediate, args.max_position_embeddings)
        torch.manual_seed(args.seed)
        target = LlamaForCausalLM(cfg)
        log(f"target: {sum(p.numel() for p in target.parameters()) / 1e6:.2f}M parameters")
        gen = torch.Generator().manual_seed(args.seed + 1)

        def ce_loss(model, x):
            logits = model(x[:, :-1]).logits.float()
            return F.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1))

        dt = train_loop("target", target, args.target_steps, args.target_lr, args.warmup, ce_loss,
                        batches(train_ids, args.batch_size, args.seq_len, gen), args.work_dir,
                        args.ckpt_every, log)
        report["target_train_s"] = round(dt, 1)
        export(target, tok, tdir, eos)
    # evaluate the shipped (bf16 -> fp32) target, as users will load it
    target = AutoModelForCausalLM.from_pretrained(str(tdir), dtype=torch.float32).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    report["target_heldout_loss"] = round(evaluate_loss(target, chunks), 4)
    log(f"target held-out loss {report['target_heldout_loss']:.4f} "
        f"(ppl {math.exp(report['target_heldout_loss']):.2f})")

    # 3. drafter, distilled from the target
    if "drafter" in stages:
        cfg = llama_config(vocab, eos, args.drafter_hidden, args.drafter_layers, args.drafter_heads,
                           args.drafter_intermediate, args.max_position_embeddings)
        torch.manual_seed(args.seed + 2)
        drafter = LlamaForCausalLM(cfg)
        log(f"drafter: {sum(p.numel() for p in drafter.parameters()) / 1e6:.2f}M parameters")
        gen = torch.Generator().manual_seed(args.seed + 3)

        def kd_loss(model, x):
            inp = x[:, :-1]
            with torch.no_grad():
                logp = F.log_softmax(target(inp).logits.float(), dim=-1)
            logq = F.log_softmax(model(inp).logits.float(), dim=-1)
            # forward KL(p_target || q_drafter), mean over positions
            return (logp.exp() * (logp - logq)).sum(-1).mean()

        dt = train_loop("drafter", drafter, args.drafter_steps, args.drafter_lr, args.warmup, kd_loss,
                        batches(train_ids, args.batch_size, args.seq_len, gen), args.work_dir,
                        args.ckpt_every, log)
        report["drafter_train_s"] = round(dt, 1)
        export(drafter, tok, ddir, eos)
    if (ddir / "model.safetensors").is_file():
        drafter = AutoModelForCausalLM.from_pretrained(str(ddir), dtype=torch.float32).eval()
        report["drafter_heldout_loss"] = round(evaluate_loss(drafter, chunks), 4)
        log(f"drafter held-out loss {report['drafter_heldout_loss']:.4f} "
            f"(ppl {math.exp(report['drafter_heldout_loss']):.2f})")

    report["total_s"] = round(time.time() - t_all, 1)
    (args.work_dir / "train_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
