"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over a user's recent items.

Shared by every sequential model (GRU4Rec reuses it): the item table is one TorchRec
``EmbeddingCollection`` (unpooled, so the planner can shard it row-wise when the catalog is larger
than one device), read through two features of the same table:

* ``seq``: the history. Sequences arrive as ``[B, L]`` item indices, left-padded with 0. Padding is
  not sent as ids: the KJT carries only the real items of each row (``L`` lookups for a full row,
  fewer for a short one), and the unpooled output is scattered back into a zero ``[B, L, d]``
  tensor at the positions where ``seq != 0``.
* ``out``: any output-side ids whose embeddings the loss or the evaluation needs (targets,
  negatives, or a rank's slice of the catalog for full softmax). They go through the same lookup,
  so their gradients reach the table through TorchRec's backward and the fused optimizer; a direct
  read of the sharded weight would bypass the fused optimizer and lose the output-side gradient.

Scores are inner products of the encoder output with these tied item embeddings (the paper's
shared item matrix). The encoder (:class:`SASRecEncoder`) is plain ``torch.nn``: right-aligned
learned positions, blocks of ``LN -> causal self-attention -> residual``, ``LN -> FFN ->
residual`` (the paper's pre-LN, eq. 5; post-LN by option), and a final LayerNorm. ``block: paper``
is instead the block of the paper's TF1 code (:class:`PaperSASRecBlock`), and ``init: xavier`` its
Glorot-uniform initialisation.

In training the encoder works on the real items only (:class:`TokenLayout`): every sublayer but the
attention is position-wise, so it runs on the ``[n, d]`` real positions, and only the attention sees
the ``[B, L, d]`` grid (the padding as zero keys that the mask excludes anyway). Recommendation
histories are mostly padding (Video: ~400 real items in a 64 x 50 batch), and the dropout masks,
LayerNorms and linear layers of the padding were most of the encoder's work. Evaluation and export
keep the grid, whose shapes do not depend on the data (``torch.export``, serving); both layouts run
the same blocks, and equal outputs are tested.

FBGEMM's kernels need a table width that is a multiple of 4. An ``embedding_dim`` that is not
(the paper's 50) gets a table rounded up to the next multiple of 4 whose extra columns are never
read, so they get no gradient, never change, and the model is exactly a ``d``-dimensional one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

PAD = 0  # item index 0: padding and out-of-vocabulary
ITEM_TABLE = "item"
SEQ_FEATURE = "seq"
OUT_FEATURE = "out"


def table_width(embedding_dim: int) -> int:
    """Columns of the stored table: ``embedding_dim`` rounded up to FBGEMM's multiple of 4."""
    return -(-embedding_dim // 4) * 4


def item_init_bound(num_items: int, init_scale: float | None) -> float:
    """The item table's U(-s, s) init bound: ``init_scale``, or by default sqrt(1 / num_items)."""
    return init_scale if init_scale is not None else math.sqrt(1.0 / num_items)


def item_collection(
    num_items: int, embedding_dim: int, init_scale: float | None, device: torch.device | None
) -> EmbeddingCollection:
    """The item table with its two features (history and output ids); ``num_items`` counts row 0."""
    scale = item_init_bound(num_items, init_scale)
    table = EmbeddingConfig(
        name=ITEM_TABLE,
        embedding_dim=table_width(embedding_dim),
        num_embeddings=num_items,
        feature_names=[SEQ_FEATURE, OUT_FEATURE],
        weight_init_min=-scale,
        weight_init_max=scale,
    )
    return EmbeddingCollection(tables=[table], device=device)


def lookup_items(
    items: nn.Module, seq: torch.Tensor, out_ids: torch.Tensor, embedding_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(history [B, L, d], out [C, d])`` from one (possibly sharded) ``EmbeddingCollection`` call.

    ``seq [B, L]`` int64 with 0 = padding, anywhere; ``out_ids [C]`` int64. The out ids ride in the
    KJT as one bag on row 0 (every key needs ``B`` lengths), which does not change the lookup.
    """
    if seq.dim() != 2:
        raise ValueError(f"seq must be [batch, length], got shape {tuple(seq.shape)}")
    batch, length = seq.shape
    mask = seq != PAD
    out_lengths = torch.zeros(batch, dtype=torch.int32, device=seq.device)
    out_lengths[0] = out_ids.numel()
    kjt = KeyedJaggedTensor(
        keys=[SEQ_FEATURE, OUT_FEATURE],
        values=torch.cat([seq[mask], out_ids.reshape(-1)]),
        lengths=torch.cat([mask.sum(dim=1).to(torch.int32), out_lengths]),
    )
    looked_up = items(kjt)
    seq_values = looked_up[SEQ_FEATURE].values()[:, :embedding_dim]
    history = seq_values.new_zeros(batch, length, embedding_dim)
    # boolean indexing enumerates positions row-major, the order the KJT values were taken in
    history = history.index_put((mask,), seq_values)
    return history, looked_up[OUT_FEATURE].values()[:, :embedding_dim]


def attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, 1, L, L]`` (True = may attend): causal, and only to real items.

    SDPA rejects ``is_causal=True`` together with an explicit mask, so the causal triangle is folded
    into the padding mask. A padding query may attend to itself, which keeps its softmax row finite
    (all -inf would give NaN); its output is zeroed after every block anyway.
    """
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=mask.device)
    return (causal & (mask[:, None, None, :] | eye)).contiguous()


class TokenLayout:
    """Where the encoder's position-wise work happens: the ``[B, L, d]`` grid or the real items only.

    ``grid(t)``: the ``[B, L, *]`` grid of a hidden tensor (zeros at padding); ``tokens(t)``: the
    layout's own form of a grid tensor; ``finish(t)``: zeros at padding, in the grid layout.
    """

    def __init__(self, mask: torch.Tensor, packed: bool) -> None:
        self.batch, self.length = mask.shape
        self.packed = packed
        if packed:
            self.index = mask.reshape(-1).nonzero().squeeze(1)
        else:
            self.keep = mask.unsqueeze(-1)

    def tokens(self, grid: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return grid
        return grid.reshape(self.batch * self.length, -1).index_select(0, self.index)

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return x
        out = x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy(0, self.index, x)
        return out.view(self.batch, self.length, -1)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.packed else x * self.keep.to(x.dtype)


class GlorotLinear(nn.Linear):
    """``nn.Linear`` with the paper's TF1 init: Glorot-uniform kernel, zero bias (``init: xavier``).

    An override of ``reset_parameters``, not an init pass after construction, because DMP
    materialises a model built on ``meta`` by calling each module's ``reset_parameters``.
    """

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class GlorotEmbedding(nn.Embedding):
    """``nn.Embedding`` with a Glorot-uniform table (the paper's position table, ``init: xavier``)."""

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention; keys and values from ``keys`` when given (the paper's block), else ``x``.

    ``output_projection=False`` is the paper's TF1 code, which concatenates the heads without one.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float, output_projection: bool = True,
                 linear: type[nn.Linear] = nn.Linear,
                 device: torch.device | None = None) -> None:  # fmt: skip
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"model.embedding_dim {dim} must be divisible by model.num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = linear(dim, dim, device=device)
        # No key bias: it adds q.b to every key's score of a query, which the softmax cancels, so its
        # gradient is rounding noise that Adam would normalise into real steps.
        self.key = linear(dim, dim, bias=False, device=device)
        self.value = linear(dim, dim, device=device)
        self.proj: nn.Module = linear(dim, dim, device=device) if output_projection else nn.Identity()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, layout: TokenLayout,
                keys: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        kv = x if keys is None else keys
        q, k, v = (
            self._heads(layout.grid(f(t))) for f, t in ((self.query, x), (self.key, kv), (self.value, kv))
        )
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        batch, _, length, _ = y.shape
        return self.proj(layout.tokens(y.transpose(1, 2).reshape(batch, length, -1)))


def feed_forward(dim: int, ffn_dim: int, dropout: float, linear: type[nn.Linear],
                 device: torch.device | None) -> nn.Sequential:  # fmt: skip
    return nn.Sequential(
        linear(dim, ffn_dim, device=device),
        nn.ReLU(),
        nn.Dropout(dropout),
        linear(ffn_dim, dim, device=device),
    )


class SASRecBlock(nn.Module):
    """``block: ours``: ``x + attn(LN(x))``, ``x + FFN(LN(x))`` (pre-LN) or post-LN; dropout on both."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, pre_ln: bool,
                 linear: type[nn.Linear] = nn.Linear,
                 device: torch.device | None = None) -> None:  # fmt: skip
        super().__init__()
        self.pre_ln = pre_ln
        self.attn_norm = nn.LayerNorm(dim, device=device)
        self.attn = CausalSelfAttention(dim, num_heads, dropout, linear=linear, device=device)
        self.ffn_norm = nn.LayerNorm(dim, device=device)
        self.ffn = feed_forward(dim, ffn_dim, dropout, linear, device)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.dropout(self.attn(self.attn_norm(x), attn_mask, layout))
            x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        else:
            x = self.attn_norm(x + self.dropout(self.attn(x, attn_mask, layout)))
            x = self.ffn_norm(x + self.dropout(self.ffn(x)))
        return layout.finish(x)


# The paper's TF1 code (kang205/SASRec ``modules.normalize``) uses this LayerNorm epsilon.
PAPER_LN_EPS = 1e-8


class PaperSASRecBlock(nn.Module):
    """``block: paper``: one block of the paper's TF1 code (kang205/SASRec ``model.py``/``modules.py``).

    Unlike :class:`SASRecBlock`: the attention's queries and residual are the *normalised* ``LN(x)``
    while its keys and values are the un-normalised ``x``; no output projection; the attention's
    only dropout is on its weights; the feed-forward residual is ``LN(x)`` too; LayerNorm eps 1e-8.
    The TF1 key bias is left out as in ``ours`` (the softmax cancels it). benchmarks/sasrec_reference.py
    measured this block learning the paper's BCE recipe faster than ``ours`` on Video.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float,
                 linear: type[nn.Linear] = nn.Linear,
                 device: torch.device | None = None) -> None:  # fmt: skip
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=PAPER_LN_EPS, device=device)
        self.attn = CausalSelfAttention(dim, num_heads, dropout, output_projection=False, linear=linear,
                                        device=device)  # fmt: skip
        self.ffn_norm = nn.LayerNorm(dim, eps=PAPER_LN_EPS, device=device)
        self.ffn = feed_forward(dim, ffn_dim, dropout, linear, device)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        queries = self.attn_norm(x)
        x = queries + self.attn(queries, attn_mask, layout, keys=x)
        h = self.ffn_norm(x)
        return layout.finish(h + self.dropout(self.ffn(h)))


BLOCKS = ("ours", "paper")
INITS = ("default", "xavier")


@dataclass
class SASRecConfig:
    num_items: int  # embedding rows, padding row 0 included
    embedding_dim: int = 50
    max_len: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    ffn_dim: int | None = None  # None: embedding_dim (the paper)
    dropout: float = 0.5
    pre_ln: bool = True  # the paper's eq. 5; False: post-LN (LN after each residual)
    scale_embeddings: bool = True  # history embeddings times sqrt(d) before the positions are added
    init_scale: float | None = None  # item table init U(-s, s); None: sqrt(1 / num_items), or Glorot's
    # "ours": SASRecBlock; "paper": the paper's TF1 block (PaperSASRecBlock), pre-LN only
    block: str = "ours"
    # "default": torch's init of the dense layers and position table; "xavier": the paper's TF1 code,
    # Glorot-uniform item table, position table and dense kernels, zero biases
    init: str = "default"

    def __post_init__(self) -> None:
        for name in ("num_items", "embedding_dim", "max_len", "num_blocks", "num_heads"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.num_items < 2:
            raise ValueError(f"model.num_items counts the padding row and >= 1 item, got {self.num_items}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.ffn_dim is not None and self.ffn_dim <= 0:
            raise ValueError(f"model.ffn_dim must be > 0, got {self.ffn_dim}")
        if self.embedding_dim % self.num_heads:
            raise ValueError(
                f"model.embedding_dim {self.embedding_dim} must be divisible by model.num_heads "
                f"{self.num_heads}"
            )
        if self.block not in BLOCKS:
            raise ValueError(f"model.block {self.block!r}: choose from {BLOCKS}")
        if self.init not in INITS:
            raise ValueError(f"model.init {self.init!r}: choose from {INITS}")
        if self.block == "paper" and not self.pre_ln:
            raise ValueError("model.pre_ln false does not apply to model.block 'paper' (its layout is fixed)")
        if self.init == "xavier" and self.init_scale is not None:
            raise ValueError(
                "model.init_scale and model.init 'xavier' both set the item table's init: give one"
            )

    def item_init_scale(self) -> float:
        """Bound ``s`` of the item table's U(-s, s) init (Glorot's for ``init: xavier``, row 0 counted)."""
        if self.init == "xavier":
            return math.sqrt(6.0 / (self.num_items + self.embedding_dim))
        return item_init_bound(self.num_items, self.init_scale)


class SASRecEncoder(nn.Module):
    """History embeddings ``[B, L, d]`` (zeros at padding) and the mask -> hidden states ``[B, L, d]``.

    Positions are counted from the most recent item: the last column is always position
    ``max_len - 1``. With the paper's fixed-length left padding that is its absolute position; it
    also makes the output independent of how much left padding a batch carries.
    """

    def __init__(self, config: SASRecConfig, device: torch.device | None = None) -> None:
        super().__init__()
        c = config
        self.max_len = c.max_len
        self.scale = math.sqrt(c.embedding_dim) if c.scale_embeddings else 1.0
        xavier = c.init == "xavier"
        linear = GlorotLinear if xavier else nn.Linear
        self.positions = (GlorotEmbedding if xavier else nn.Embedding)(
            c.max_len, c.embedding_dim, device=device
        )
        self.dropout = nn.Dropout(c.dropout)
        ffn_dim = c.ffn_dim or c.embedding_dim
        self.blocks = nn.ModuleList(
            PaperSASRecBlock(c.embedding_dim, c.num_heads, ffn_dim, c.dropout, linear, device)
            if c.block == "paper"
            else SASRecBlock(c.embedding_dim, c.num_heads, ffn_dim, c.dropout, c.pre_ln, linear, device)
            for _ in range(c.num_blocks)
        )
        # pre-LN leaves the residual stream unnormalised; post-LN blocks already end in a LayerNorm
        eps = PAPER_LN_EPS if c.block == "paper" else 1e-5
        self.final_norm: nn.Module = (
            nn.LayerNorm(c.embedding_dim, eps=eps, device=device) if c.pre_ln else nn.Identity()
        )

    def forward(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = history.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds model.max_len {self.max_len}")
        layout = TokenLayout(mask, packed=self.training)
        pos = torch.arange(self.max_len - length, self.max_len, device=history.device)
        x = layout.finish(self.dropout(layout.tokens(history * self.scale + self.positions(pos))))
        attn_mask = attention_mask(mask)
        for block in self.blocks:
            x = block(x, attn_mask, layout)
        return layout.grid(layout.finish(self.final_norm(x)))


class SequentialRecommender(nn.Module):
    """Item table + a dense encoder: ``(seq [B, L], out_ids [C]) -> (hidden [B, L, d], out [C, d])``.

    ``hidden[:, t]`` is the representation after the items up to ``t``; its score for item ``i`` is
    ``hidden[:, t] @ embedding(i)``.
    """

    def __init__(self, num_items: int, embedding_dim: int, encoder: nn.Module, init_scale: float | None,
                 device: torch.device | None = None) -> None:  # fmt: skip
        super().__init__()
        self.num_items = num_items
        self.embedding_dim = embedding_dim
        self.items = item_collection(num_items, embedding_dim, init_scale, device)
        self.encoder = encoder

    def forward(self, seq: torch.Tensor, out_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        history, out = lookup_items(self.items, seq, out_ids, self.embedding_dim)
        return self.encoder(history, seq != PAD), out

    def item_weight(self) -> torch.Tensor:
        """The ``[num_items, d]`` item embeddings of an unsharded model (row 0 = padding)."""
        return self.items.embeddings[ITEM_TABLE].weight[:, : self.embedding_dim]


class SASRec(SequentialRecommender):
    def __init__(self, config: SASRecConfig, device: torch.device | None = None) -> None:
        super().__init__(
            config.num_items,
            config.embedding_dim,
            SASRecEncoder(config, device),
            config.item_init_scale(),
            device,
        )
        self.config = config


class QueryEncoder(nn.Module):
    """Serving-side next-item query tower: plain ``torch`` only, exportable with ``torch.export``.

    ``seq [B, L]`` int64 item indices, left-padded with 0 (the most recent item last) -> the last
    position's hidden state ``[B, d]``, to be matched by inner product against the item embeddings.
    Padding gets a zero embedding, exactly what the training lookup scatters there.
    """

    def __init__(self, item_weight: torch.Tensor, encoder: nn.Module) -> None:
        super().__init__()
        self.item_embedding = nn.Embedding.from_pretrained(item_weight.detach().clone(), freeze=True)
        self.encoder = encoder

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        mask = seq != PAD
        history = self.item_embedding(seq) * mask.unsqueeze(-1).to(self.item_embedding.weight.dtype)
        return self.encoder(history, mask)[:, -1]
