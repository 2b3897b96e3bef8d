"""3D multi-head self-attention with decomposed relative position bias, as in SAM-Med3D's ViT.

SAM-Med3D's "windowed" blocks use window_size 14 on an 8^3 token grid: the normed tokens are zero-padded to
14^3 and one unmasked attention runs over all 2,744 positions, the 2,232 padded ones acting as keys/values.
The released weights were trained that way, so we must reproduce it. ``padded_window_attention_fast`` computes
the identical result attending to the real keys plus ONE aggregated "padding key":

* every padded token is the zero vector, so its key and value are the projection of zero (the qkv bias) —
  the same for all padded positions;
* padded keys differ only by their relative-position bias, which is a sum of per-axis terms
  ``Rd[a] + Rh[b] + Rw[c]``; the sum of ``exp`` over the padded set (full 14^3 box minus the 8^3 real box)
  therefore factorises per axis, and can be written as a sum of three positive products (no cancellation):
  ``F_d F_h R_w + F_d R_h E_w + R_d E_h E_w`` with E = sum over real positions, R = over padded, F = E + R.

The padded set thus collapses to one extra key with logit ``q.k_pad * scale + log(P)`` and value ``v_pad``.
``padded_window_attention_naive`` is the literal definition, kept only for tests and benchmarks.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

Grid = tuple[int, int, int]


def relative_position_table(size_q: int, size_k: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Gather relative-position embeddings for every (query, key) index pair along one axis.

    Args:
        size_q: number of query positions along the axis.
        size_k: number of key positions along the axis.
        rel_pos: table (L, head_dim), L = 2 * max(size_q, size_k) - 1 at training time.

    Returns:
        (size_q, size_k, head_dim), entry [i, j] = rel_pos[i - j + size_k - 1] (rescaled if sizes differ).
    """
    max_rel_dist = 2 * max(size_q, size_k) - 1
    if rel_pos.shape[0] != max_rel_dist:
        # SAM convention for a table trained at another resolution: linear interpolation of the table.
        rel_pos = (
            F.interpolate(rel_pos.t().unsqueeze(0), size=max_rel_dist, mode="linear").squeeze(0).t().contiguous()
        )
    q_coords = torch.arange(size_q, device=rel_pos.device)[:, None] * max(size_k / size_q, 1.0)
    k_coords = torch.arange(size_k, device=rel_pos.device)[None, :] * max(size_q / size_k, 1.0)
    index = (q_coords - k_coords) + (size_k - 1) * max(size_q / size_k, 1.0)
    return rel_pos[index.long()]


def decomposed_rel_pos_terms(
    q: torch.Tensor, grid_q: Grid, key_sizes: Grid, tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis relative-position logits.

    Args:
        q: (BH, Nq, head_dim) unscaled queries, Nq = prod(grid_q).
        grid_q: query grid (D, H, W).
        key_sizes: key extent along each axis (the keys span [0, size) along each axis).
        tables: rel_pos_d, rel_pos_h, rel_pos_w.

    Returns:
        rel_d (BH, D, H, W, Kd), rel_h (BH, D, H, W, Kh), rel_w (BH, D, H, W, Kw).
    """
    d, h, w = grid_q
    r_q = q.reshape(q.shape[0], d, h, w, q.shape[-1])
    terms = []
    for axis, (size_q, size_k, table) in enumerate(zip(grid_q, key_sizes, tables)):
        # Queries sit at the same indices in the padded window as in the grid, so index by size_q rows of a
        # (size_k, size_k) relation: rows 0..size_q-1.
        rel = relative_position_table(size_k, size_k, table)[:size_q]
        equation = ["bdhwc,dkc->bdhwk", "bdhwc,hkc->bdhwk", "bdhwc,wkc->bdhwk"][axis]
        terms.append(torch.einsum(equation, r_q, rel))
    return terms[0], terms[1], terms[2]


def add_rel_pos_bias(
    attn: torch.Tensor, rel_d: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, grid_q: Grid, grid_k: Grid
) -> torch.Tensor:
    """attn (BH, Nq, Nk) + broadcast sum of the per-axis terms over the key grid."""
    bh = attn.shape[0]
    attn = attn.view(bh, *grid_q, *grid_k)
    attn = attn + rel_d[..., :, None, None] + rel_h[..., None, :, None] + rel_w[..., None, None, :]
    return attn.view(bh, grid_q[0] * grid_q[1] * grid_q[2], grid_k[0] * grid_k[1] * grid_k[2])


def global_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Grid, tables, scale: float
) -> torch.Tensor:
    """Full attention over a grid with decomposed relative position bias. q, k, v: (BH, N, hd) -> (BH, N, hd)."""
    attn = (q * scale) @ k.transpose(-2, -1)
    rel_d, rel_h, rel_w = decomposed_rel_pos_terms(q, grid, grid, tables)
    attn = add_rel_pos_bias(attn, rel_d, rel_h, rel_w, grid, grid)
    return attn.softmax(dim=-1) @ v


def padded_window_attention_fast(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pad: torch.Tensor,
    v_pad: torch.Tensor,
    grid: Grid,
    window: int,
    tables,
    scale: float,
) -> torch.Tensor:
    """Exact result of attention over the grid zero-padded (at the end of each axis) to ``window^3``.

    Args:
        q, k, v: (BH, N, hd) for the real tokens, N = prod(grid).
        k_pad, v_pad: (BH, 1, hd) key/value of a zero (padding) token.
        grid: real grid (D, H, W), each <= window.
        window: padded window side.

    Returns:
        (BH, N, hd) outputs at the real query positions.
    """
    sizes = (window, window, window)
    rel_d, rel_h, rel_w = decomposed_rel_pos_terms(q, grid, sizes, tables)  # each (BH, D, H, W, window)
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = add_rel_pos_bias(attn, rel_d[..., : grid[0]], rel_h[..., : grid[1]], rel_w[..., : grid[2]], grid, grid)

    def split_lse(rel: torch.Tensor, real: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inside = torch.logsumexp(rel[..., :real], dim=-1)
        if real == rel.shape[-1]:
            outside = torch.full_like(inside, float("-inf"))
        else:
            outside = torch.logsumexp(rel[..., real:], dim=-1)
        return inside, outside, torch.logaddexp(inside, outside)

    in_d, out_d, all_d = split_lse(rel_d, grid[0])
    in_h, out_h, all_h = split_lse(rel_h, grid[1])
    in_w, out_w, all_w = split_lse(rel_w, grid[2])
    # log of sum over (full box) minus (real box), as three positive products.
    log_pad_mass = torch.logsumexp(
        torch.stack([all_d + all_h + out_w, all_d + out_h + in_w, out_d + in_h + in_w], dim=-1), dim=-1
    ).reshape(q.shape[0], -1, 1)
    pad_logit = (q * scale) @ k_pad.transpose(-2, -1) + log_pad_mass  # (BH, N, 1)
    probs = torch.cat([attn, pad_logit], dim=-1).softmax(dim=-1)
    return probs[..., :-1] @ v + probs[..., -1:] * v_pad


def padded_window_attention_naive(
    x_padded_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor], grid: Grid, window: int, tables, scale: float
) -> torch.Tensor:
    """Literal definition: attention over all window^3 positions, then keep the real grid. Tests/benchmarks only.

    Args:
        x_padded_qkv: q, k, v (BH, window^3, hd) computed from the zero-padded tokens.

    Returns:
        (BH, N, hd) outputs at the real query positions (cropped back to the grid).
    """
    q, k, v = x_padded_qkv
    full = (window, window, window)
    out = global_attention(q, k, v, full, tables, scale)
    bh, _, hd = out.shape
    out = out.view(bh, window, window, window, hd)[:, : grid[0], : grid[1], : grid[2]]
    return out.reshape(bh, -1, hd)


class Attention3D(nn.Module):
    """Multi-head attention over a (B, D, H, W, C) token grid with decomposed 3D relative position bias.

    ``window_size`` > 0 reproduces SAM-Med3D's single padded window (grid zero-padded to window^3).
    ``impl`` selects "fast" (exact, see module docstring) or "naive" (literal) computation of that case.
    """

    def __init__(self, dim: int, num_heads: int, rel_pos_size: int, window_size: int = 0, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.window_size = window_size
        self.impl = "fast"
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        table_len = 2 * rel_pos_size - 1
        self.rel_pos_d = nn.Parameter(torch.zeros(table_len, head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(table_len, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(table_len, head_dim))
        # Optional callable (x, qkv) -> qkv adding parameter-efficient deltas (e.g. FacT); set by extensions.
        self.qkv_delta = None

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        if self.qkv_delta is not None:
            qkv = self.qkv_delta(x, qkv)
        return qkv

    def _split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, 3C) -> q, k, v each (B*heads, N, hd)."""
        b, n, _ = qkv.shape
        qkv = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, n, -1).unbind(0)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, D, H, W, C) -> (B, D, H, W, C)."""
        b, d, h, w, c = x.shape
        grid = (d, h, w)
        tables = (self.rel_pos_d, self.rel_pos_h, self.rel_pos_w)
        if self.window_size <= 0:
            q, k, v = self._split_heads(self._qkv(x).reshape(b, d * h * w, -1))
            out = global_attention(q, k, v, grid, tables, self.scale)
        elif max(grid) > self.window_size:
            raise NotImplementedError(
                f"token grid {grid} exceeds window {self.window_size}: only SAM-Med3D's single padded window is "
                "supported (input crops up to window_size * patch_size per side)"
            )
        elif self.impl == "naive":
            ws = self.window_size
            x_pad = F.pad(x, (0, 0, 0, ws - w, 0, ws - h, 0, ws - d))
            qkv = self._split_heads(self._qkv(x_pad).reshape(b, ws**3, -1))
            out = padded_window_attention_naive(qkv, grid, ws, tables, self.scale)
        else:
            q, k, v = self._split_heads(self._qkv(x).reshape(b, d * h * w, -1))
            zero_token = x.new_zeros(b, 1, c)
            _, k_pad, v_pad = self._split_heads(self._qkv(zero_token))
            out = padded_window_attention_fast(q, k, v, k_pad, v_pad, grid, self.window_size, tables, self.scale)
        out = out.view(b, self.num_heads, d, h, w, -1).permute(0, 2, 3, 4, 1, 5).reshape(b, d, h, w, -1)
        return self.proj(out)
