"""A decoder-only transformer written for one device, in two families.

`gpt2`: LayerNorm, learned positions, GELU, tied embeddings, biases.
`llama`: RMSNorm, rotary positions, SwiGLU, untied embeddings, grouped-query attention, no biases.
Variants that imported models bring, all off by default: `head_dim` other than d_model / n_head (Llama 3.x), biases
on q/k/v only (`qkv_bias`, Qwen2), rotary scaling (`linear`, `llama3`) and a sliding attention window (Mistral).

The seam for sparsity methods lives in two modules:
- `FFN.active`: indices of the neurons to compute this step (None = all). The step then multiplies by
  `index_select`ed weight slices: smaller GEMMs, real speed (SAT, structured MST).
- `Attention.active`: indices of the key/value head groups to compute (None = all); each group carries its
  query heads. `Attention.block_mask`: a FlexAttention BlockMask (hybrid sparse attention, MST); None = causal SDPA
  (within the model's sliding window, when it has one; a method's mask must include the window: `attention_masks`
  builds masks with `limit`).
A method may also replace `Block.mlp` with another module of the same signature (MoE: upcycling, SSD).
Parallelism (DDP, FSDP2) and compilation are applied from outside, in the trainer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

from sparsetrain.config import ModelConfig
from sparsetrain.errors import UserError
from sparsetrain.nn.attention_masks import cached_dense_mask, dense_mask
from sparsetrain.nn.kernels.cross_entropy import cross_entropy

# SDPA's backends in the order each `Attention.kernel` tries them: a preference, so shapes the first cannot serve go
# on down the list. "torch" keeps PyTorch's own order (cuDNN first on Hopper with cuDNN >= 9.15.1, else
# FlashAttention-2).
SDPA_ORDERS = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
}
ATTENTION_KERNELS = ("torch", *SDPA_ORDERS)
# cuDNN's attention before 9.15.1 can fault on query lengths that are not a multiple of 128 (PyTorch issue 169849),
# so "cudnn" is asked for only at such lengths (training's); others keep PyTorch's order.
CUDNN_LENGTH_MULTIPLE = 128


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool, kernel: str) -> torch.Tensor:
    """Causal SDPA with `kernel`'s backend order (`ATTENTION_KERNELS`); torch.compile bakes the choice in."""
    order = SDPA_ORDERS.get(kernel)
    if order is None or (kernel == "cudnn" and q.shape[-2] % CUDNN_LENGTH_MULTIPLE):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    with sdpa_kernel(order, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


@dataclass
class ModelArgs:
    """A fully resolved model shape (no zeros meaning 'default')."""

    family: str
    n_layer: int
    n_head: int
    n_kv_head: int
    d_model: int
    d_ff: int
    vocab_size: int
    max_seq_len: int
    activation: str
    norm_eps: float
    rope_theta: float
    tie_embeddings: bool
    bias: bool
    head_dim: int = 0  # 0 = d_model // n_head
    qkv_bias: bool | None = None  # None = bias
    rope_scaling: str = "none"  # none | linear | llama3
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 0  # llama3; 0 = max_seq_len
    sliding_window: int = 0  # 0 = every earlier key

    def __post_init__(self):
        # Filled here, so that a ModelArgs written out (asdict) and resolved again compares equal.
        if not self.head_dim and self.n_head:
            self.head_dim = self.d_model // self.n_head
        if self.qkv_bias is None:
            self.qkv_bias = self.bias

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"


FAMILY_DEFAULTS = {
    "gpt2": dict(activation="gelu", norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=True, bias=True),
    "llama": dict(activation="swiglu", norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=False, bias=False),
}

PRESETS = {
    # CPU tests and the demo.
    "tiny": dict(family="gpt2", n_layer=2, n_head=4, d_model=128, d_ff=512, max_seq_len=256),
    "tiny-llama": dict(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=128, d_ff=352, max_seq_len=256),
    # GPT-2 small / medium shapes (124M / 350M with GPT-2's vocabulary), without biases as nanoGPT trains them:
    # 40.3% / 44.9% MFU against 38.2% / 42.8% with biases on the H100 (BENCHMARKS.md). model.bias = true adds them.
    "gpt2-small": dict(family="gpt2", n_layer=12, n_head=12, d_model=768, d_ff=3072, max_seq_len=1024, bias=False),
    "gpt2-medium": dict(family="gpt2", n_layer=24, n_head=16, d_model=1024, d_ff=4096, max_seq_len=1024,
                        bias=False),
    # ~1.1B llama (TinyLlama-like width, 16 layers).
    "llama-1b": dict(family="llama", n_layer=16, n_head=32, n_kv_head=8, d_model=2048, d_ff=8192, max_seq_len=2048),
}

ACTIVATIONS = ("gelu", "relu", "relu2", "swiglu")
ROPE_SCALINGS = ("none", "linear", "llama3")


def resolve(cfg: ModelConfig, vocab_size: int | None = None) -> ModelArgs:
    """Preset, then family defaults, then the user's overrides."""
    if cfg.preset not in PRESETS:
        raise UserError(f"unknown model.preset '{cfg.preset}'; presets: {', '.join(PRESETS)}")
    values = dict(PRESETS[cfg.preset])
    family = cfg.family or values["family"]
    if family not in FAMILY_DEFAULTS:
        raise UserError(f"unknown model.family '{family}'; families: gpt2, llama")
    merged = {**FAMILY_DEFAULTS[family], **values, "family": family}
    for key in ["n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "vocab_size", "max_seq_len",
                "activation", "norm_eps", "rope_theta", "tie_embeddings", "bias", "head_dim", "qkv_bias",
                "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                "rope_original_max_seq_len", "sliding_window"]:
        v = getattr(cfg, key)
        if isinstance(v, bool) or v not in (0, 0.0, "", None):  # False == 0, but False is a choice
            merged[key] = v
    if not merged.get("vocab_size"):
        if vocab_size is None:
            raise UserError("model.vocab_size is unknown; prepare data first or set model.vocab_size")
        merged["vocab_size"] = vocab_size
    merged.setdefault("n_kv_head", merged["n_head"])
    if not merged["n_kv_head"]:
        merged["n_kv_head"] = merged["n_head"]
    args = ModelArgs(**merged)
    if args.activation not in ACTIVATIONS:
        raise UserError(f"unknown model.activation '{args.activation}'; choose one of {', '.join(ACTIVATIONS)}")
    if not cfg.head_dim and args.d_model % args.n_head:
        raise UserError(f"model.d_model={args.d_model} is not a multiple of model.n_head={args.n_head}; "
                        "set model.head_dim to give the heads another width")
    if args.n_head % args.n_kv_head:
        raise UserError(f"model.n_head={args.n_head} is not a multiple of model.n_kv_head={args.n_kv_head}")
    check_variants(args)
    return args


def check_variants(args: ModelArgs) -> None:
    """UserError for a head width, rotary scaling or window that the model cannot compute."""
    if args.head_dim <= 0 or (args.family == "llama" and args.head_dim % 2):
        raise UserError(f"model.head_dim={args.head_dim} must be positive (and even for rotary positions)")
    if args.rope_scaling not in ROPE_SCALINGS:
        raise UserError(f"unknown model.rope_scaling '{args.rope_scaling}'; choose one of {', '.join(ROPE_SCALINGS)}")
    if args.rope_scaling != "none" and args.family != "llama":
        raise UserError(f"model.rope_scaling='{args.rope_scaling}' needs rotary positions (family llama), "
                        f"this model is {args.family}")
    if args.rope_factor <= 0:
        raise UserError(f"model.rope_factor must be positive, got {args.rope_factor}")
    if args.rope_scaling == "llama3" and not 0 < args.rope_low_freq_factor < args.rope_high_freq_factor:
        raise UserError(f"llama3 rope scaling needs 0 < model.rope_low_freq_factor < model.rope_high_freq_factor, "
                        f"got {args.rope_low_freq_factor} and {args.rope_high_freq_factor}")
    if args.rope_original_max_seq_len < 0 or args.sliding_window < 0:
        raise UserError("model.rope_original_max_seq_len and model.sliding_window must be >= 0 (0 = off)")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # In the weight's dtype (fp32), as autocast runs LayerNorm: a bf16 residual stream is read, not kept, in bf16.
        return F.rms_norm(x.to(self.weight.dtype), (x.shape[-1],), self.weight, self.eps)


def make_norm(args: ModelArgs) -> nn.Module:
    if args.family == "llama":
        return RMSNorm(args.d_model, args.norm_eps)
    return nn.LayerNorm(args.d_model, eps=args.norm_eps, bias=args.bias)


def scaled_frequencies(inv_freq: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Rotary frequencies stretched as Hugging Face computes them: `linear` divides all by the factor; `llama3`
    (Llama 3.1) divides the low ones (wavelength above original / low_freq_factor), keeps the high ones (below
    original / high_freq_factor) and blends in between."""
    factor = args.rope_factor
    if args.rope_scaling == "linear":
        return inv_freq / factor
    original = args.rope_original_max_seq_len or args.max_seq_len
    low, high = args.rope_low_freq_factor, args.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < original / high) * ~(wavelen > original / low)
    return torch.where(medium, blended, scaled)


def rope_tables(head_dim: int, max_seq_len: int, theta: float,
                scaling: ModelArgs | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim] in the half-split layout that Hugging Face Llama uses (rotate_half); `scaling`: the
    args whose rope_scaling stretches the frequencies."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is not None and scaling.rope_scaling != "none":
        inv_freq = scaled_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        self.rope = args.family == "llama"
        self.sliding_window = args.sliding_window  # a plain int: 0 leaves the causal path as it was
        # q, k, v in one matrix: rows [q heads | k heads | v heads], each head_dim rows.
        self.qkv = nn.Linear(args.d_model, (args.n_head + 2 * args.n_kv_head) * args.head_dim, bias=args.qkv_bias)
        self.proj = nn.Linear(args.n_head * args.head_dim, args.d_model, bias=args.bias)
        self.active: torch.Tensor | None = None  # kept kv-head groups this step (sorted), None = all
        self.block_mask = None  # FlexAttention BlockMask (a bool [T, T] tensor on CPU), None = causal SDPA
        self.kernel = "torch"  # causal SDPA's backend order (`ATTENTION_KERNELS`; the trainer's train.attention_kernel)

    def group_rows(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of `qkv` and columns of `proj` of the kv-head groups `groups` (each with its query heads)."""
        per_group = self.n_head // self.n_kv_head
        d = self.head_dim
        heads = (groups[:, None] * per_group + torch.arange(per_group, device=groups.device)).flatten()
        q_rows = (heads[:, None] * d + torch.arange(d, device=groups.device)).flatten()
        kv = (groups[:, None] * d + torch.arange(d, device=groups.device)).flatten()
        k_rows = self.n_head * d + kv
        v_rows = (self.n_head + self.n_kv_head) * d + kv
        return torch.cat([q_rows, k_rows, v_rows]), q_rows

    def head_outputs(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                     groups: torch.Tensor | None = None) -> torch.Tensor:
        """Each head's attention output before `proj`, [B, heads, T, head_dim], for the kv-head groups `groups`
        (None = all; each group with its query heads)."""
        return self._attend(x, rope, groups, None if groups is None else self.group_rows(groups)[0])

    def _attend(self, x, rope, groups, rows) -> torch.Tensor:
        """`head_outputs` with the qkv rows of `groups` already found (forward needs them and the proj columns)."""
        B, T, _ = x.shape
        d = self.head_dim
        if groups is None:
            n_head, n_kv = self.n_head, self.n_kv_head
            qkv = self.qkv(x)
        else:
            n_kv = groups.numel()
            n_head = n_kv * (self.n_head // self.n_kv_head)
            bias = self.qkv.bias.index_select(0, rows) if self.qkv.bias is not None else None
            qkv = F.linear(x, self.qkv.weight.index_select(0, rows), bias)
        q, k, v = qkv.split([n_head * d, n_kv * d, n_kv * d], dim=-1)
        # Heads go in whole kv groups, so the group size never changes; a plain bool (n_head != n_kv would be a
        # symbolic one once torch.compile makes the kept count dynamic, which SDPA refuses: a graph break).
        gqa = self.n_head != self.n_kv_head
        q = q.view(B, T, n_head, d).transpose(1, 2)
        k = k.view(B, T, n_kv, d).transpose(1, 2)
        v = v.view(B, T, n_kv, d).transpose(1, 2)
        if self.rope:
            cos, sin = rope[0][:T], rope[1][:T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = self.block_mask
        if mask is None and self.sliding_window and T > self.sliding_window:
            # The model's own window (Mistral) as a dense boolean mask: exact on every device (not faster). Compiled,
            # it is built inside the graph (dynamo would trace through the cache anyway); eager, once per length.
            if torch.compiler.is_compiling():
                mask = dense_mask("causal", T, 0, 1, q.device, limit=self.sliding_window)
            else:
                mask = cached_dense_mask("causal", T, 0, 1, str(q.device), limit=self.sliding_window)
        if isinstance(mask, torch.Tensor):  # a boolean [T, T] mask (on CPU also the stand-in for a BlockMask)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:T, :T], enable_gqa=gqa)
        if mask is not None:
            return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
        return causal_attention(q, k, v, gqa, self.kernel)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, _ = x.shape
        if self.active is None:
            return self.proj(self._attend(x, rope, None, None).transpose(1, 2).reshape(B, T, -1))
        rows, cols = self.group_rows(self.active)
        y = self._attend(x, rope, self.active, rows).transpose(1, 2).reshape(B, T, -1)
        return F.linear(y, self.proj.weight.index_select(1, cols), self.proj.bias)


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(h, approximate="tanh")
    if activation == "relu":
        return F.relu(h)
    if activation == "relu2":
        return F.relu(h).square()
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    raise ValueError(activation)


class FFN(nn.Module):
    """Feed-forward block. For swiglu, `fc` holds [gate rows | up rows] so one GEMM computes both."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.activation = args.activation
        self.d_ff = args.d_ff
        self.fc = nn.Linear(args.d_model, args.d_ff * (2 if args.gated else 1), bias=args.bias)
        self.proj = nn.Linear(args.d_ff, args.d_model, bias=args.bias)
        self.active: torch.Tensor | None = None  # kept neurons this step (sorted), None = all

    def in_rows(self, neurons: torch.Tensor) -> torch.Tensor:
        """Rows of `fc` that feed the given neurons (gate and up rows together for swiglu)."""
        if self.activation == "swiglu":
            return torch.cat([neurons, neurons + self.d_ff])
        return neurons

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The activations, one column per neuron (the thing whose sparsity SSD studies)."""
        return activate(self.fc(x), self.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active is None:
            return self.proj(activate(self.fc(x), self.activation))
        rows = self.in_rows(self.active)
        bias = self.fc.bias.index_select(0, rows) if self.fc.bias is not None else None
        h = activate(F.linear(x, self.fc.weight.index_select(0, rows), bias), self.activation)
        return F.linear(h, self.proj.weight.index_select(1, self.active), self.proj.bias)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm1 = make_norm(args)
        self.attn = Attention(args)
        self.norm2 = make_norm(args)
        self.mlp = FFN(args)

    def forward(self, x, rope):
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.wte = nn.Embedding(args.vocab_size, args.d_model)
        self.wpe = nn.Embedding(args.max_seq_len, args.d_model) if args.family == "gpt2" else None
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.norm = make_norm(args)
        self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.loss_kernel = "auto"  # how the loss runs (`cross_entropy.KERNELS`; the trainer's train.loss_kernel)
        # Under autocast, carry the residual stream in autocast's dtype rather than the embeddings' fp32 (the
        # trainer's train.residual_dtype, bf16 by default there): norms, residual adds and their gradients move half
        # the bytes. Without autocast nothing changes.
        self.low_precision_residual = False
        if args.family == "llama":
            cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta, args)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2 init: normal(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * self.args.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    @property
    def attention_kernel(self) -> str:
        """How every layer's causal attention runs (`ATTENTION_KERNELS`); set for all layers at once."""
        return self.blocks[0].attn.kernel

    @attention_kernel.setter
    def attention_kernel(self, kernel: str) -> None:
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got '{kernel}'")
        for block in self.blocks:
            block.attn.kernel = kernel

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits [B, T, V] when targets is None, else the mean cross-entropy loss (a scalar)."""
        B, T = idx.shape
        if T > self.args.max_seq_len:
            raise UserError(f"sequence of {T} tokens exceeds model.max_seq_len={self.args.max_seq_len}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        if self.low_precision_residual and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        rope = (self.rope_cos, self.rope_sin) if self.rope_cos is not None else None
        for block in self.blocks:
            x = block(x, rope)
        return self.output(x, targets)

    def output(self, x: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """The final norm and the output layer: logits, or with targets the mean cross-entropy loss."""
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        return cross_entropy(logits, targets, self.loss_kernel)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def flops_per_token(args: ModelArgs, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token, by part, at 2 FLOPs per multiply-add (training is 3x: backward twice forward).

    The parts let a method scale what it skips: `attn_linear` and `attn_scores` by the kept heads, `ffn` by the
    kept neurons. `attn_scores` counts the full T x T product (the convention of the 6N + 12LdT formula).
    """
    d, L = args.d_model, args.n_layer
    q, kv = args.n_head * args.head_dim, args.n_kv_head * args.head_dim
    attn_linear = 2 * (d * (q + 2 * kv) + q * d)
    attn_scores = 2 * 2 * seq_len * q
    ffn = 2 * d * args.d_ff * (3 if args.gated else 2)
    return {
        "attn_linear": L * attn_linear,
        "attn_scores": L * attn_scores,
        "ffn": L * ffn,
        "head": 2 * d * args.vocab_size,
    }


def build(cfg: ModelConfig, vocab_size: int | None = None) -> Transformer:
    return Transformer(resolve(cfg, vocab_size))
