"""Mask attention module (MAM) of MaskAttn-UNet.

A transformer block over the pixels of a feature map whose attention logits receive an
additive mask ``M`` that suppresses uninformative key positions::

    Attn(X) = softmax(Q K^T / sqrt(d) + M) V

Memory stays linear in the number of pixels N: when N exceeds ``max_tokens`` the keys and
values come from an average-pooled copy of the tokens (spatial-reduction attention), and
key-only masks are passed to ``scaled_dot_product_attention`` as (B, 1, 1, Nk) tensors that
broadcast over queries, so no N x N tensor is ever built.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MASK_KINDS", "MaskAttention", "key_gated_attention", "key_grid_size"]

MASK_KINDS = ("gate", "hard", "bias", "none")


def key_grid_size(height: int, width: int, max_tokens: int) -> Tuple[int, int]:
    """Grid of key/value tokens that :class:`MaskAttention` uses for an (height, width) input.

    The reduction ratio is the smallest integer ``r`` such that
    ``ceil(height / r) * ceil(width / r) <= max_tokens``; ``r == 1`` (no pooling) when the
    input already has few enough pixels.

    Returns:
        (key_height, key_width).
    """
    if height < 1 or width < 1:
        raise ValueError(f"grid must be non-empty, got {height}x{width}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    ratio = 1
    # Bounded: at ratio = max(height, width) the grid is 1x1.
    while math.ceil(height / ratio) * math.ceil(width / ratio) > max_tokens:
        ratio += 1
    return math.ceil(height / ratio), math.ceil(width / ratio)


def key_gated_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor
) -> torch.Tensor:
    """
    ``softmax(q k^T / sqrt(d) + M) v`` for an additive mask ``M`` over keys only, computed as
    attention without a mask over gated values: with ``g = exp(M - max M)``,
    ``sum_j e^(s_ij) g_j v_j / sum_j e^(s_ij) g_j``, the gates riding along as one more value
    channel. Same values and gradients (up to rounding) as the masked form; on CPU it is ~2x
    faster in training, where PyTorch's fused attention kernel takes no gradient for a mask
    and falls back to the explicit (N x Nk) softmax. Head dims are zero-padded to one common
    multiple of 8 (the fused kernel's fast path wants q, k and v of one size).

    Args:
        q: (B, heads, N, d); k, v: (B, heads, Nk, d).
        key_mask: (B, 1, 1, Nk) additive mask (log-gates; -inf closes a key), not all -inf.

    Returns:
        (B, heads, N, d).
    """
    b, heads, _, d = q.shape
    num_keys = k.shape[2]
    # Shifting M by a constant leaves the output unchanged; the shift keeps the largest gate at 1.
    gates = torch.exp(key_mask - key_mask.amax(dim=-1, keepdim=True).detach()).transpose(-1, -2)
    width = -(-(d + 1) // 8) * 8
    values = torch.cat([v * gates, gates.expand(b, heads, num_keys, 1)], dim=-1)
    out = F.scaled_dot_product_attention(
        F.pad(q, (0, width - d)),
        F.pad(k, (0, width - d)),
        F.pad(values, (0, width - d - 1)),
        scale=d**-0.5,
    )
    return out[..., :d] / out[..., d : d + 1].clamp(min=torch.finfo(out.dtype).tiny)


class MaskAttention(nn.Module):
    """Pre-norm transformer block over pixels with a learned additive attention mask.

    ``y = x + proj(Attn(LN(x)))``, then ``y = y + FFN(LN(y))`` with a GELU FFN. The mask
    kinds are:

    * ``"gate"``: a 1x1 conv on ``x`` predicts a logit ``m_j`` per position and
      ``M[i, j] = log sigmoid(m_j)``, a soft key gate shared by all queries and heads.
    * ``"hard"``: keys with ``sigmoid(m_j) < 0.5`` get ``-inf`` (Mask2Former style). If every
      key of an image would be closed, all its keys stay open so no softmax row is empty.
      Open keys get ``0`` in the forward pass but ``d log sigmoid(m_j)`` in the backward pass
      (straight-through), so the gate conv keeps learning.
    * ``"bias"``: a learned relative-position bias per head over the fixed key grid
      ``grid_size``; a query's position is its cell in that grid, so the table has
      ``(2 * kh - 1) * (2 * kw - 1)`` entries per head.
    * ``"none"``: plain multi-head self-attention (the ablation).

    The gate conv and the bias table start at zero, so every kind starts as plain
    attention and learns its mask.
    """

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int = 4,
        mask_kind: str = "gate",
        max_tokens: int = 256,
        ffn_ratio: float = 2.0,
        dropout: float = 0.0,
        grid_size: Optional[Tuple[int, int]] = None,
    ):
        """
        Args:
            channels: C, channels of the input feature map.
            num_heads: attention heads; must divide ``channels``.
            mask_kind: one of :data:`MASK_KINDS`.
            max_tokens: most key/value tokens; larger inputs get pooled keys/values.
            ffn_ratio: hidden width of the FFN as a multiple of ``channels``.
            dropout: dropout probability on attention weights, attention output and FFN.
            grid_size: (kh, kw) key grid after reduction; required by (and only used by)
                ``mask_kind="bias"``. See :func:`key_grid_size`.
        """
        super().__init__()
        if channels < 1 or num_heads < 1 or channels % num_heads != 0:
            raise ValueError(
                f"channels ({channels}) must be a positive multiple of num_heads ({num_heads})"
            )
        if mask_kind not in MASK_KINDS:
            raise ValueError(f"unknown mask_kind {mask_kind!r}; expected one of {MASK_KINDS}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if ffn_ratio <= 0:
            raise ValueError(f"ffn_ratio must be > 0, got {ffn_ratio}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if mask_kind == "bias":
            if grid_size is None or len(grid_size) != 2 or min(grid_size) < 1:
                raise ValueError(
                    f"mask_kind 'bias' needs grid_size=(kh, kw) of positive ints, got {grid_size}"
                )
            grid_size = (int(grid_size[0]), int(grid_size[1]))
        elif grid_size is not None:
            raise ValueError(f"grid_size is only used by mask_kind 'bias', not {mask_kind!r}")

        self.channels = channels
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.mask_kind = mask_kind
        self.max_tokens = max_tokens
        self.dropout = dropout
        self.grid_size = grid_size

        self.norm1 = nn.LayerNorm(channels)
        self.q_proj = nn.Linear(channels, channels)
        self.k_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.out_proj = nn.Linear(channels, channels)
        self.proj_drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(channels)
        hidden = max(1, int(round(channels * ffn_ratio)))
        self.ffn = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, channels),
            nn.Dropout(dropout),
        )

        self.gate = None
        if mask_kind in ("gate", "hard"):
            self.gate = nn.Conv2d(channels, 1, kernel_size=1)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        self.bias_table = None
        if mask_kind == "bias":
            kh, kw = grid_size
            self.bias_table = nn.Parameter(torch.zeros(num_heads, (2 * kh - 1) * (2 * kw - 1)))

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_heads={self.num_heads}, "
            f"mask_kind={self.mask_kind!r}, max_tokens={self.max_tokens}"
        )

    # ------------------------------------------------------------------ public API
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """
        Args:
            x: (B, C, H, W) feature map.

        Returns:
            y: (B, C, H, W) output.
            gate_logits: (B, 1, H, W) gate logits at the input resolution for kinds "gate"
                and "hard" (to be supervised or visualised), else None.
        """
        self._check_input(x)
        b, c, h, w = x.shape
        gate_logits = self.gate(x) if self.gate is not None else None
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = tokens + self.proj_drop(self.attend(self.norm1(tokens), (h, w), gate_logits))
        tokens = tokens + self.ffn(self.norm2(tokens))
        return tokens.transpose(1, 2).reshape(b, c, h, w), gate_logits

    def attend(
        self,
        tokens: torch.Tensor,
        size: Tuple[int, int],
        gate_logits: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The masked multi-head attention sub-block (no norm, no residual).

        Args:
            tokens: (B, N, C) already-normalised tokens of an (H, W) = ``size`` grid.
            size: (H, W) with H * W == N.
            gate_logits: (B, 1, H, W) gate logits; required for kinds "gate" and "hard".

        Returns:
            (B, N, C): heads merged and projected by ``out_proj``.
        """
        q, k, v, mask = self._project(tokens, size, gate_logits)
        dropout = self.dropout if self.training else 0.0
        if (
            mask is not None
            and mask.requires_grad
            and mask.shape[-2] == 1  # key-only: the "gate" and "hard" kinds
            and dropout == 0.0
            and q.device.type == "cpu"
        ):
            out = key_gated_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.channels))

    @torch.no_grad()
    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of the module for ``x``, for inspection and tests.

        Builds the (B, heads, N, Nk) probability tensor explicitly, so use it on small
        inputs only; :meth:`forward` never materialises it.

        Args:
            x: (B, C, H, W) feature map.

        Returns:
            (B, num_heads, H * W, Nk) softmax weights, Nk = number of key tokens.
        """
        self._check_input(x)
        h, w = x.shape[-2:]
        gate_logits = self.gate(x) if self.gate is not None else None
        tokens = self.norm1(x.flatten(2).transpose(1, 2))
        q, k, _, mask = self._project(tokens, (h, w), gate_logits)
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if mask is not None:
            logits = logits + mask
        return logits.softmax(dim=-1)

    # ------------------------------------------------------------------ internals
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"MaskAttention expects a (B, {self.channels}, H, W) tensor, "
                f"got shape {tuple(x.shape)}"
            )

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        # (B, N, C) -> (B, heads, N, head_dim)
        b, n, _ = t.shape
        return t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _project(
        self,
        tokens: torch.Tensor,
        size: Tuple[int, int],
        gate_logits: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Queries at full resolution, keys/values on the (possibly pooled) key grid, mask.

        Returns:
            q: (B, heads, N, d); k, v: (B, heads, Nk, d); mask: additive float mask
            broadcastable to (B, heads, N, Nk) in q's dtype, or None.
        """
        b, n, c = tokens.shape
        h, w = size
        if h * w != n:
            raise ValueError(f"size {h}x{w} does not match {n} tokens")
        kh, kw = key_grid_size(h, w, self.max_tokens)
        kv_tokens = tokens
        if (kh, kw) != (h, w):
            grid = tokens.transpose(1, 2).reshape(b, c, h, w)
            kv_tokens = F.adaptive_avg_pool2d(grid, (kh, kw)).flatten(2).transpose(1, 2)
        q = self._split_heads(self.q_proj(tokens))
        k = self._split_heads(self.k_proj(kv_tokens))
        v = self._split_heads(self.v_proj(kv_tokens))

        mask = None
        if self.mask_kind in ("gate", "hard"):
            if gate_logits is None or gate_logits.shape != (b, 1, h, w):
                raise ValueError(
                    f"mask_kind {self.mask_kind!r} needs gate_logits of shape {(b, 1, h, w)}, "
                    f"got {None if gate_logits is None else tuple(gate_logits.shape)}"
                )
            key_logits = gate_logits
            if (kh, kw) != (h, w):
                key_logits = F.adaptive_avg_pool2d(gate_logits, (kh, kw))
            mask = self._gate_mask(key_logits.reshape(b, 1, 1, kh * kw).float())
        elif self.mask_kind == "bias":
            if (kh, kw) != self.grid_size:
                raise ValueError(
                    f"input grid {h}x{w} gives a {kh}x{kw} key grid (max_tokens="
                    f"{self.max_tokens}), but the bias table was built for {self.grid_size}"
                )
            mask = self._relative_bias(h, w).unsqueeze(0)
        if mask is not None:
            mask = mask.to(q.dtype)
        return q, k, v, mask

    def _gate_mask(self, key_logits: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, Nk) gate logits -> (B, 1, 1, Nk) additive key mask."""
        soft = F.logsigmoid(key_logits)
        if self.mask_kind == "gate":
            return soft
        closed = key_logits < 0  # sigmoid(m) < 0.5
        # Guard: an image whose keys are all closed keeps them all (as Mask2Former does),
        # otherwise its softmax rows would be all -inf, i.e. NaN.
        closed = closed & ~closed.all(dim=-1, keepdim=True)
        hard = torch.zeros_like(soft).masked_fill(closed, float("-inf"))
        # Straight-through: forward value is exactly `hard`, gradient is that of `soft`.
        return hard + (soft - soft.detach())

    def _relative_bias(self, h: int, w: int) -> torch.Tensor:
        """(heads, H * W, kh * kw) relative-position bias between query cells and keys."""
        kh, kw = self.grid_size
        device = self.bias_table.device
        # A query's cell in the key grid is the adaptive-pooling bin it falls into.
        qy = torch.arange(h, device=device) * kh // h
        qx = torch.arange(w, device=device) * kw // w
        rel_y = qy[:, None] - torch.arange(kh, device=device)[None, :] + kh - 1  # (H, kh)
        rel_x = qx[:, None] - torch.arange(kw, device=device)[None, :] + kw - 1  # (W, kw)
        index = rel_y[:, None, :, None] * (2 * kw - 1) + rel_x[None, :, None, :]
        return self.bias_table[:, index.reshape(h * w, kh * kw)]
