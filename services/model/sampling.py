"""Lossless token choice and verification math, pure torch (docs/architecture.md, "Lossless sampling").

Terms:
- *position* j: absolute index in the token sequence (prompt included) of the token being chosen.
- *coupled* choice: greedy argmax when temperature is 0, otherwise Gumbel-max sampling
  argmax(filtered(logits / T) + g_j), where g_j is a Gumbel noise vector that is a deterministic
  function of (seed, j, token id). It is an exact sample from the filtered softmax, and drafter and
  target using the same g_j makes "draft accepted" equal to "draft == target token". So DSI, SI and
  non-SI produce identical output for the same seed, whatever the drafter (Gumbel-max coupling).
- *rejection* verification (Leviathan et al. 2023; Chen et al. 2023): accept draft d with
  probability min(1, p(d)/q(d)); on rejection resample from norm(max(0, p - q)) (the *recovered*
  token); after the last draft, the *bonus* token is sampled from p.

The noise is computed on the CPU in float64 from an integer hash, then moved to the logits'
device, so it is bit-identical on CPU and GPU.
"""

from __future__ import annotations

import torch

from dsi.services.runtime.params import Sampling as Sampling  # re-exported for the model code

_MASK32 = 0xFFFFFFFF
# Salts that give independent noise streams for the same (seed, position).
_SALT_CHOICE = 0x0
_SALT_DRAFT_SAMPLE = 0x5BD1E995
_SALT_ACCEPT = 0x27D4EB2F
_SALT_RECOVER = 0x165667B1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding 32-bit values (wraps like uint32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seed: int, position: int, size: int, salt: int = _SALT_CHOICE) -> torch.Tensor:
    """Uniforms in (0, 1), one per token id, deterministic in (seed, position, salt).  # [size] f64"""
    key = torch.tensor(
        [(seed & _MASK32) ^ salt, (seed >> 32) & _MASK32, position & _MASK32], dtype=torch.int64
    )
    k = _mix32(key[0:1] ^ _mix32(key[1:2] ^ _mix32(key[2:3] + 0x9E3779B9)))
    ids = torch.arange(size, dtype=torch.int64)
    h = _mix32(_mix32(ids ^ k) + 0x632BE5AB & _MASK32)
    return (h.to(torch.float64) + 0.5) / 4294967296.0


def gumbel_noise(seed: int, position: int, size: int, salt: int = _SALT_CHOICE) -> torch.Tensor:
    """Standard Gumbel noise g = -log(-log(u)).  # [size] f64"""
    return -torch.log(-torch.log(uniform_noise(seed, position, size, salt)))


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p; removed tokens get -inf.  # [n, vocab] -> [n, vocab] f32"""
    assert logits.dim() == 2, f"expected [n, vocab], got {tuple(logits.shape)}"
    scaled = logits.float() / temperature
    vocab = scaled.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # [n, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)  # [n, vocab]
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep a token when the mass before it is below top_p (the most likely token always stays).
        remove_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        scaled = scaled.masked_fill(remove, float("-inf"))
    return scaled


def target_distribution(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The filtered softmax that sampling draws from.  # [n, vocab] -> [n, vocab] f32"""
    return torch.softmax(filter_logits(logits, s.temperature, s.top_k, s.top_p), dim=-1)


def coupled_choice(logits: torch.Tensor, positions: list[int], s: Sampling) -> list[int]:
    """Token at each position: argmax (greedy) or Gumbel-max with the shared noise g_j.

    logits: [n, vocab], row i predicts positions[i].
    """
    assert logits.dim() == 2 and logits.shape[0] == len(positions), (logits.shape, len(positions))
    if s.greedy:
        return [int(t) for t in torch.argmax(logits, dim=-1).tolist()]
    filtered = filter_logits(logits, s.temperature, s.top_k, s.top_p)  # [n, vocab]
    vocab = filtered.shape[-1]
    noise = torch.stack([gumbel_noise(s.seed, j, vocab) for j in positions])  # [n, vocab] f64
    scores = filtered.double() + noise.to(filtered.device)
    return [int(t) for t in torch.argmax(scores, dim=-1).tolist()]


def draft_sample(logits: torch.Tensor, position: int, s: Sampling) -> tuple[int, torch.Tensor]:
    """Rejection mode, drafter side: a sample from q and q itself.  # [vocab] -> (id, [vocab])"""
    q = target_distribution(logits.unsqueeze(0), s)[0]  # [vocab]
    g = gumbel_noise(s.seed, position, q.shape[-1], _SALT_DRAFT_SAMPLE).to(q.device)
    token = int(torch.argmax(torch.log(q).double() + g))
    return token, q


def sparse_from_dense(q: torch.Tensor) -> tuple[list[int], list[float]]:
    """Non-zero entries of a distribution.  # [vocab] -> (ids, probs)"""
    ids = torch.nonzero(q > 0).flatten()
    return ids.tolist(), q[ids].tolist()


def dense_from_sparse(ids: list[int], probs: list[float], vocab: int, device: torch.device) -> torch.Tensor:
    """Inverse of sparse_from_dense.  # -> [vocab] f32"""
    q = torch.zeros(vocab, dtype=torch.float32, device=device)
    if ids:
        q[torch.tensor(ids, device=device)] = torch.tensor(probs, dtype=torch.float32, device=device)
    return q


def rejection_verify(
    logits: torch.Tensor,
    drafts: list[int],
    draft_q: list[torch.Tensor],
    first_position: int,
    s: Sampling,
) -> list[int]:
    """Rejection sampling over one window; returns the target's token at every scored position.

    logits: [len(drafts) + 1, vocab], row i predicts position first_position + i; drafts[i] sits at
    that position and draft_q[i] ([vocab]) is the drafter's distribution there. The returned token
    is the draft when accepted, the recovered token when rejected (it never equals the draft), and
    at the last row the bonus token sampled from p. Positions after a rejection are still filled
    (as if the preceding drafts had been accepted) because the caller ignores them.
    """
    assert logits.shape[0] == len(drafts) + 1 == len(draft_q) + 1, (logits.shape, len(drafts))
    p = target_distribution(logits, s)  # [n + 1, vocab]
    out: list[int] = []
    for i, (d, q) in enumerate(zip(drafts, draft_q, strict=True)):
        j = first_position + i
        u = float(uniform_noise(s.seed, j, 1, _SALT_ACCEPT)[0])
        p_d, q_d = float(p[i, d]), float(q[d])
        if q_d > 0 and u * q_d < p_d:
            out.append(d)
            continue
        residual = torch.clamp(p[i] - q.to(p.device), min=0.0)  # [vocab]
        if float(residual.sum()) <= 0.0:
            residual = p[i]
        g = gumbel_noise(s.seed, j, residual.shape[-1], _SALT_RECOVER).to(p.device)
        out.append(int(torch.argmax(torch.log(residual).double() + g)))
    last = first_position + len(drafts)
    out.extend(coupled_choice(logits[-1:], [last], s))
    return out
