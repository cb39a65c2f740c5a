#!/usr/bin/env python
"""Measure DSI's built-in default model pair and print the figures of its model card as JSON.

Loads ``<dir>/target`` and ``<dir>/drafter`` exactly as users do (AutoModelForCausalLM, offline,
float32) and measures, on the held-out slice of the standard-library corpus (same split as
scripts/train_default_pair.py):

- held-out next-token loss and perplexity of both models (``--eval-chunks`` x ``--seq-len`` tokens);
- greedy acceptance: for each held-out prompt (``--prompts`` prompts of ``--prompt-len`` tokens),
  the target generates ``--gen-len`` tokens greedily; at each step the drafter's greedy token on the
  same prefix (prompt + target tokens so far) is compared with the target's; acceptance =
  matches / total;
- sampled acceptance at temperature 1.0 along a target-sampled continuation: the Gumbel-coupled
  rate (draft == target token under the same Gumbel noise) and the expected acceptance
  sum_x min(p(x), q(x));
- single-token decode latency (KV cache, batch 1, ``--threads`` threads) of both, and the ratio;
- a greedy continuation of ``def fibonacci(n):``; parameter counts and sizes on disk.

``--write-card`` also writes ``<dir>/card.json`` (figures, held-out prompts and file hashes) that
tests/integration/test_pretrained_pair.py checks.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import statistics
import sys
import time

from dsi.acceptance import greedy_acceptance

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = pathlib.Path(__file__).resolve().parent


def _train_module():
    spec = importlib.util.spec_from_file_location("train_default_pair", HERE / "train_default_pair.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def heldout_prompts(tok, texts: list[str], n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens from the held-out files (those of at least 2 x length tokens):
    prompt k comes from file k % F, at the (k // F + 1)-th of ceil(n / F) evenly spaced points of it."""
    files = [enc.ids for enc in tok.backend_tokenizer.encode_batch(texts)]
    files = [ids for ids in files if len(ids) >= 2 * length]
    reps = -(-n // len(files))
    prompts = []
    for k in range(n):
        ids = files[k % len(files)]
        s = (k // len(files) + 1) * len(ids) // (reps + 1) - length // 2
        s = max(0, min(s, len(ids) - length))
        prompts.append(ids[s : s + length])
    return prompts


def sampled_acceptance(target, drafter, prompts, gen_len: int, seed: int, temperature: float = 1.0):
    """Along a continuation sampled from the target (Gumbel-max, seeded): the Gumbel-coupled
    acceptance rate (drafter's argmax under the same noise == target's token) and the mean expected
    acceptance sum_x min(p, q)."""
    import torch
    import torch.nn.functional as F
    from transformers import DynamicCache

    x = torch.tensor(prompts, dtype=torch.long)
    plen = x.size(1)
    gen = torch.Generator().manual_seed(seed)
    vocab = target.config.vocab_size
    u = torch.rand((x.size(0), gen_len, vocab), generator=gen).clamp_(1e-20, 1 - 1e-7)
    gumbel = -torch.log(-torch.log(u))
    with torch.inference_mode():
        cache = DynamicCache(config=target.config)
        out = target(x, cache=cache, use_cache=True)
        seq, tlog = x, []
        for i in range(gen_len):
            lg = out.logits[:, -1].float() / temperature
            tlog.append(lg)
            nxt = (lg + gumbel[:, i]).argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            if i + 1 < gen_len:
                out = target(nxt, cache=cache, use_cache=True)
        dlog = drafter(seq[:, :-1]).logits[:, plen - 1 :].float() / temperature
    tlog = torch.stack(tlog, dim=1)
    coupled = ((dlog + gumbel).argmax(-1) == seq[:, plen:]).float().mean().item()
    expected = torch.minimum(F.softmax(tlog, -1), F.softmax(dlog, -1)).sum(-1).mean().item()
    return coupled, expected


def decode_latency_ms(model, prompt: list[int], steps: int) -> float:
    """Median wall time of one single-token forward with a KV cache (batch 1) after a prefill."""
    import torch
    from transformers import DynamicCache

    times = []
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(torch.tensor([prompt]), cache=cache, use_cache=True)
        for i in range(steps + 10):
            nxt = out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            out = model(nxt, cache=cache, use_cache=True)
            if i >= 10:
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def greedy_text(model, tok, text: str, max_new_tokens: int) -> str:
    import torch

    ids = tok(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens)
    return tok.decode(out[0], skip_special_tokens=True)


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dir_size(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("dsi/pretrained"),
                   help="directory holding target/ and drafter/")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled-acceptance noise")
    p.add_argument("--heldout-every", type=int, default=25, help="must match the training split")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-chunks", type=int, default=256)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--latency-steps", type=int, default=200)
    p.add_argument("--latency-rounds", type=int, default=3,
                   help="alternate target/drafter latency runs this many times; keep each one's minimum")
    p.add_argument("--write-card", action="store_true", help="also write <dir>/card.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    train = _train_module()
    tdir, ddir = args.dir / "target", args.dir / "drafter"
    tok = AutoTokenizer.from_pretrained(str(tdir))
    target = AutoModelForCausalLM.from_pretrained(str(tdir), dtype=torch.float32).eval()
    drafter = AutoModelForCausalLM.from_pretrained(str(ddir), dtype=torch.float32).eval()

    _, held_texts = train.split_corpus(args.heldout_every)
    held = train.encode_stream(tok, held_texts)
    chunks = train.heldout_chunks(held, args.seq_len, args.eval_chunks)
    prompts = heldout_prompts(tok, held_texts, args.prompts, args.prompt_len)

    res: dict = {"python": sys.version.split()[0], "torch": torch.__version__, "threads": args.threads}
    for name, m, d in (("target", target, tdir), ("drafter", drafter, ddir)):
        loss = train.evaluate_loss(m, chunks)
        res[name] = {
            "parameters": sum(p.numel() for p in m.parameters()),
            "layers": m.config.num_hidden_layers,
            "hidden_size": m.config.hidden_size,
            "intermediate_size": m.config.intermediate_size,
            "heads": m.config.num_attention_heads,
            "dir_bytes": dir_size(d),
            "safetensors_bytes": (d / "model.safetensors").stat().st_size,
            "safetensors_sha256": sha256(d / "model.safetensors"),
            "heldout_loss": round(loss, 4),
            "heldout_ppl": round(math.exp(loss), 3),
        }
    res["heldout_tokens_scored"] = sum(c.numel() - 1 for c in chunks)

    matches, total = greedy_acceptance(target, drafter, prompts, args.gen_len)
    res["greedy_acceptance"] = round(matches / total, 4)
    res["greedy_matches"], res["greedy_total"] = matches, total
    coupled, expected = sampled_acceptance(target, drafter, prompts, args.gen_len, args.seed)
    res["sampled_acceptance_gumbel_t1"] = round(coupled, 4)
    res["expected_acceptance_t1"] = round(expected, 4)

    lt, ld = [], []
    for _ in range(args.latency_rounds):
        lt.append(decode_latency_ms(target, prompts[0], args.latency_steps))
        ld.append(decode_latency_ms(drafter, prompts[0], args.latency_steps))
    res["target_decode_ms"] = round(min(lt), 3)
    res["drafter_decode_ms"] = round(min(ld), 3)
    res["latency_ratio_drafter_over_target"] = round(min(ld) / min(lt), 4)

    res["fibonacci_target"] = greedy_text(target, tok, "def fibonacci(n):", 64)
    res["fibonacci_drafter"] = greedy_text(drafter, tok, "def fibonacci(n):", 64)

    if args.write_card:
        card = {
            "greedy_acceptance": res["greedy_acceptance"],
            "greedy_acceptance_definition": (
                "for each held-out prompt the TARGET generates gen_len tokens greedily; at each step "
                "the drafter's greedy token on the same prefix is compared with the target's; "
                "acceptance = matches / total"
            ),
            "gen_len": args.gen_len,
            "heldout_prompts": prompts,
            "measurements": res,
        }
        (args.dir / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
