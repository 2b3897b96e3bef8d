"""3D multi-head self-attention with SAM-Med3D's decomposed relative position bias.

Two upstream behaviours are reproduced exactly, because the released weights were trained with them:

* **Padded window.** "Windowed" blocks use window_size 14 on an 8^3 token grid: the normed tokens are zero-padded
  (at the end of each axis) to 14^3 and one unmasked attention runs over all 2,744 positions; padded positions act
  as keys/values (their q, k, v are the qkv bias) and the output is cropped back to 8^3.
* **Mis-broadcast bias.** Upstream's per-axis terms land on other key axes. For queries on a cube of side n and
  per-axis tables ``R_x[a, m] = rel_pos_x[a - m + n - 1]``, the bias added for query (i, j, l) and key (p, r, s) is
  ``q(i,j,l).R_d[i,s] + q(i,j,p).R_h[j,s] + q(i,j,r).R_w[r,s]`` (q unscaled); the second and third terms read the
  query at another position, which in a padded window may be a padding position (q = the q bias).

``padded_window_attention_naive`` is the literal definition (attention over the padded cube). The production path
``padded_window_attention_fast`` attends to the real keys plus ONE aggregated padding key: all padded keys share
k_pad and v_pad and differ only by their bias, whose exp-sum over the padded set factors per key axis for a fixed
s (derivation in docs/method.md, "Exact padded-window attention").
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

Grid = tuple[int, int, int]
Tables = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


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


def upstream_bias_terms(
    q_grid: torch.Tensor, q_rows: torch.Tensor, side: int, tables: Tables
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three per-axis terms of upstream's bias on a cube of side ``side``.

    Args:
        q_grid: (BH, X, Y, Z, hd) unscaled queries at the real query positions.
        q_rows: (BH, X, Y, side, hd) queries along the last axis read by the second and third terms: positions
            (i, j, p) for p < side; equal to ``q_grid`` when Z == side (no padding).
        side: cube side n of the attention (8 for a global block, the padded 14 for a windowed one).
        tables: rel_pos_d, rel_pos_h, rel_pos_w.

    Returns:
        term_d (BH, X, Y, Z, n)    [i, j, l, s] = q(i,j,l).R_d[i,s]
        term_h (BH, X, Y, n, n)    [i, j, p, s] = q(i,j,p).R_h[j,s]
        term_w (BH, X, Y, n, n)    [i, j, r, s] = q(i,j,r).R_w[r,s]
    """
    r_d, r_h, r_w = (relative_position_table(side, side, table) for table in tables)
    x, y = q_grid.shape[1], q_grid.shape[2]
    term_d = torch.einsum("bxyzc,xsc->bxyzs", q_grid, r_d[:x])
    term_h = torch.einsum("bxypc,ysc->bxyps", q_rows, r_h[:y])
    term_w = torch.einsum("bxyrc,rsc->bxyrs", q_rows, r_w)
    return term_d, term_h, term_w


def add_upstream_bias(attn: torch.Tensor, terms, grid_q: Grid, grid_k: Grid) -> torch.Tensor:
    """attn (BH, Nq, Nk) + upstream's bias restricted to keys in ``grid_k`` (a corner box of the cube)."""
    term_d, term_h, term_w = terms
    kd, kh, kw = grid_k
    bh = attn.shape[0]
    attn = attn.view(bh, *grid_q, *grid_k)
    attn = (
        attn
        + term_d[:, :, :, :, None, None, :kw]
        + term_h[:, :, :, None, :kd, None, :kw]
        + term_w[:, :, :, None, None, :kh, :kw]
    )
    return attn.view(bh, grid_q[0] * grid_q[1] * grid_q[2], kd * kh * kw)


def _check_cube(grid: Grid) -> int:
    if not grid[0] == grid[1] == grid[2]:
        raise ValueError(f"SAM-Med3D's relative-position bias is defined on a cubic token grid, got {grid}")
    return grid[0]


def global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Grid, tables: Tables, scale: float):
    """Full attention over a cubic grid with upstream's bias. q, k, v: (BH, N, hd) -> (BH, N, hd)."""
    side = _check_cube(grid)
    q_grid = q.reshape(q.shape[0], *grid, q.shape[-1])
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = add_upstream_bias(attn, upstream_bias_terms(q_grid, q_grid, side, tables), grid, grid)
    return attn.softmax(dim=-1) @ v


def _split_lse(term: torch.Tensor, real: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log-sum-exp of ``term`` over its second-last axis: real part [:real], padded part [real:], and all."""
    inside = torch.logsumexp(term[..., :real, :], dim=-2)
    if real == term.shape[-2]:
        outside = torch.full_like(inside, float("-inf"))
    else:
        outside = torch.logsumexp(term[..., real:, :], dim=-2)
    return inside, outside, torch.logaddexp(inside, outside)


def padding_log_mass(terms, real: int) -> torch.Tensor:
    """log of sum over the padded keys (cube n^3 minus the real box real^3) of exp(bias), per real query.

    For a fixed key coordinate s the bias is term_d[s] + term_h[p, s] + term_w[r, s], so the sum over the padded
    (p, r) is F_h F_w - [s < real] E_h E_w with E = sum over the real rows, F = over all rows; written as positive
    products R_h F_w + E_h R_w (R = F - E) for s < real, and F_h F_w for s >= real.

    Returns:
        (BH, X, Y, Z) log mass.
    """
    term_d, term_h, term_w = terms
    in_h, out_h, all_h = _split_lse(term_h, real)  # (BH, X, Y, n) over p
    in_w, out_w, all_w = _split_lse(term_w, real)  # over r
    inner_real_s = torch.logaddexp(out_h + all_w, in_h + out_w)[..., :real]
    inner_pad_s = (all_h + all_w)[..., real:]
    inner = torch.cat([inner_real_s, inner_pad_s], dim=-1)  # (BH, X, Y, n) over s
    return torch.logsumexp(term_d + inner[:, :, :, None, :], dim=-1)


def padded_window_attention_fast(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qkv_pad: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    grid: Grid,
    window: int,
    tables: Tables,
    scale: float,
) -> torch.Tensor:
    """Exact result of attention over the grid zero-padded (at the end of each axis) to ``window^3``.

    Args:
        q, k, v: (BH, N, hd) for the real tokens, N = prod(grid).
        qkv_pad: q, k, v (BH, 1, hd) of a zero (padding) token.
        grid: real cubic grid (g, g, g), g <= window.
        window: padded window side.

    Returns:
        (BH, N, hd) outputs at the real query positions.
    """
    g = _check_cube(grid)
    q_pad, k_pad, v_pad = qkv_pad
    bh, _, hd = q.shape
    q_grid = q.reshape(bh, g, g, g, hd)
    padding_rows = q_pad.reshape(bh, 1, 1, 1, hd).expand(bh, g, g, window - g, hd)
    terms = upstream_bias_terms(q_grid, torch.cat([q_grid, padding_rows], dim=3), window, tables)
    attn = add_upstream_bias((q * scale) @ k.transpose(-2, -1), terms, grid, grid)
    pad_logit = (q * scale) @ k_pad.transpose(-2, -1) + padding_log_mass(terms, g).reshape(bh, -1, 1)
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
            qkv_pad = self._split_heads(self._qkv(x.new_zeros(b, 1, c)))
            out = padded_window_attention_fast(q, k, v, qkv_pad, grid, self.window_size, tables, self.scale)
        out = out.view(b, self.num_heads, d, h, w, -1).permute(0, 2, 3, 4, 1, 5).reshape(b, d, h, w, -1)
        return self.proj(out)
