"""A Mixture-of-Experts FFN: a drop-in for `Block.mlp` (sparse upcycling; the sparse phase of SSD).

Experts of width f are stored stacked, ready for grouped GEMMs and easy to map to other formats:
    router  nn.Linear(d, E, bias=False)
    w_in    [E, d, n_in]   n_in = 2f for swiglu, laid out [gate | up] like `FFN.fc`; else n_in = f
    w_out   [E, f, d]
    in_bias [E * n_in], out_bias [E * d]   (gpt2 family only; kept 1-D, like the dense biases, so the
                                            trainer's "decay only >= 2-D parameters" rule skips them)

Routing and expert compute are separate steps, so another router can be plugged in (override `route`):
    route(x [N, d]) -> expert_ids [N, k], weights [N, k]        token choice, optional capacity limit
    experts(x, expert_ids, weights) -> [N, d]                   plan, two grouped GEMMs, combine
Expert choice (each expert takes its top-C tokens) gives every expert exactly C rows: a batched matmul.

The dispatch (`dispatch`, `Plan`): the N*k assignments are planned (which sorted row is which token's choice,
where each expert's group ends), each row goes through its expert's two GEMMs, and the k outputs of a token are
summed with their weights. On a GPU the plan is a Triton counting sort (`kernels.moe_gemm`), elsewhere a stable
sort. `kernel` picks how the GEMMs run (`KERNELS`): the Triton GEMMs gather rows inside the first GEMM and scatter
them inside the second, so no permuted copy of the activations exists; the others gather rows into sorted copies
(`GatherRows`: gathers as backward, not atomic scatter-adds) around torch's grouped GEMM or one GEMM per expert.
`offs[-1]` always equals the number of rows: tokens over an expert's capacity are still multiplied, with weight
0, so no grouped GEMM ever leaves rows past `offs[-1]` uninitialised (forward output or gradient), and an
uninitialised NaN can never meet a 0 weight. Experts with no tokens are empty groups.

Losses, kept on the layer for the step (`aux_loss`; the method sums them over layers):
    load balancing (Switch): E * sum_e f_e * P_e, f_e = share of the N*k assignments the router gave expert e
                             (before capacity drops), P_e = mean router probability of e; 1 when balanced.
    router z-loss:           mean over tokens of logsumexp(logits)^2.
Expert choice is balanced by construction: it gets the z-loss only. The layer sees one device's tokens; with
several ranks, `Upcycle.aux_loss` counts f_e over all of them (from the layer's `balance`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsetrain.errors import UserError
from sparsetrain.nn.kernels import moe_gemm
from sparsetrain.nn.model import ModelArgs, Transformer, activate

# Public from torch 2.10; the private op before that.
grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

ROUTERS = ("softmax_then_topk", "topk_then_softmax", "expert_choice")


# --- routing: pure functions of the router logits ----------------------------------------------------------------
def token_choice(logits: torch.Tensor, top_k: int, mode: str, renormalize: bool):
    """Each token picks its top-k experts. Returns expert_ids [N, k], weights [N, k], probs [N, E] (fp32).
    A sort of each row's E values, not topk: one small kernel instead of two on the GPU."""
    probs = logits.softmax(dim=-1)
    if mode == "topk_then_softmax":
        top_logits, expert_ids = logits.sort(dim=-1, descending=True)
        return expert_ids[:, :top_k], top_logits[:, :top_k].softmax(dim=-1), probs
    weights, expert_ids = probs.sort(dim=-1, descending=True)
    weights, expert_ids = weights[:, :top_k], expert_ids[:, :top_k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return expert_ids, weights, probs


def expert_choice(logits: torch.Tensor, capacity: int):
    """Each expert picks its top-`capacity` tokens (Zhou et al. 2022). Returns token_ids [E, C], weights [E, C],
    probs [N, E]. Non-causal: a token's experts depend on the other tokens of the batch (the upcycling paper used
    it in encoders)."""
    probs = logits.softmax(dim=-1)
    weights, token_ids = probs.t().topk(capacity, dim=-1)
    return token_ids, weights, probs


def capacity_keep(expert_ids: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments fit in their expert's capacity [N, k] (bool). First choices of all tokens come before
    any second choice (GShard's priority), then token order."""
    N, k = expert_ids.shape
    flat = expert_ids.t().reshape(-1)  # slot-major
    sorted_ids, order = flat.sort(stable=True)
    # Rank of each assignment inside its expert's group: position minus the group's first position.
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - torch.searchsorted(sorted_ids, sorted_ids)
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    return (rank < capacity).view(k, N).t()


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert [E] (fp32), without bincount's data-dependent output size."""
    flat = expert_ids.reshape(-1)
    return torch.zeros(num_experts, device=flat.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float))


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss E * sum_e f_e * P_e (f_e from `counts`, no gradient; P_e with)."""
    return balance_loss(probs.mean(dim=0), counts)


def balance_loss(mean_probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e from P [E] (mean router probabilities) and the assignment counts [E]."""
    return mean_probs.shape[-1] * torch.dot(counts / counts.sum(), mean_probs)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    return logits.logsumexp(dim=-1).square().mean()


# --- expert compute ------------------------------------------------------------------------------------------------
class GatherRows(torch.autograd.Function):
    """x.index_select(0, index), where `index` lists every row of x `repeat` times and output row
    inverse[i * repeat + j] is the j-th copy of row i. The backward is then a gather and a sum over the copies,
    not index_select's atomic scatter-add (slow in bf16, and lossy: it accumulates in bf16)."""

    @staticmethod
    def forward(ctx, x, index, inverse, repeat: int):
        ctx.save_for_backward(inverse)
        ctx.repeat = repeat
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad = grad.index_select(0, inverse)
        if ctx.repeat > 1:
            grad = grad.view(-1, ctx.repeat, grad.shape[-1])
            if torch.compiler.is_compiling():
                # Inductor turns a sum over this short middle dimension into a slow reduction kernel; written
                # as k - 1 additions it fuses into one pointwise kernel with the gather.
                grad = sum(grad[:, j] for j in range(1, ctx.repeat)) + grad[:, 0]
            else:
                grad = grad.sum(dim=1)
        return grad, None, None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: autocast's when it is on (grouped_mm has no autocast rule), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def group_gemm(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Rows of `a` grouped by expert (group e ends at offs[e]) times w[e]: one grouped GEMM, or the reference,
    one GEMM per expert (a host sync for the group sizes)."""
    if grouped:
        return grouped_mm(a, w, offs=offs)
    ends = offs.tolist()
    return torch.cat([a[start:end] @ w[e] for e, (start, end) in enumerate(zip([0] + ends[:-1], ends))])


# How the expert GEMMs run. "grouped_mm": sorted copies of the rows around torch's grouped GEMM (cuBLAS/CUTLASS);
# "triton": rows gathered and scattered inside Triton GEMMs (`kernels.moe_gemm`), no copies; "loop": one GEMM per
# expert (the oracle). "auto": in a forward without autograd (evaluation, inference, generation) the Triton kernels
# on a GPU in bf16/fp16 (the faster there at every width measured, BENCHMARKS.md, eighth round); in training
# grouped_mm where its dtype and alignment rules hold (the faster forward + backward at every width measured), else
# triton on a GPU, else the loop. On a GPU every kernel plans the routing with the counting-sort kernel.
KERNELS = ("auto", "triton", "grouped_mm", "loop")


def choose_kernel(layer: nn.Module, dtype: torch.dtype, device: torch.device) -> str:
    """The kernel an MoE layer (`MoEFFN`, SSD's FFN: a `kernel` choice, a `grouped_mm_ok` rule, `d_expert`) runs
    with now. `auto` on a GPU in bf16/fp16: the Triton kernels for forward-only passes, and in training for narrow
    experts (a width the short-depth kernel takes whole, `moe_gemm.SHORT_K`); torch's grouped GEMM for wider
    experts in training (BENCHMARKS.md, twelfth round: SSD's 256-wide experts, upcycled gpt2-small's 3072)."""
    choice, grouped_mm_ok = layer.kernel, layer.grouped_mm_ok(dtype, device)
    if choice not in KERNELS:
        raise ValueError(f"unknown MoE kernel {choice!r}: choose one of {', '.join(KERNELS)}")
    if choice == "auto":
        triton_ok = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and moe_gemm.available(device)
        if triton_ok and (not torch.is_grad_enabled() or layer.d_expert in moe_gemm.SHORT_K):
            return "triton"
        if grouped_mm_ok:
            return "grouped_mm"
        return "triton" if triton_ok else "loop"
    if choice == "triton" and not moe_gemm.available(device):
        raise ValueError(f"the triton MoE kernels cannot run on {device.type} here: install triton (GPU), or set "
                         "TRITON_INTERPRET=1 (CPU, slow), or choose kernel 'grouped_mm' or 'loop'")
    if choice == "triton" and dtype not in moe_gemm.DTYPES:
        raise ValueError(f"the triton MoE kernels take bf16, fp16 or fp32, not {dtype}: choose kernel 'loop'")
    if choice == "grouped_mm" and not grouped_mm_ok:
        return "loop"  # grouped_mm needs bf16 (any dtype in CPU eager) and 16-byte aligned rows
    return choice


def check_kernel(choice: str, device: torch.device) -> None:
    """A user error, before training, where a method's `kernel` option names kernels that cannot run on `device`."""
    if choice == "triton" and not moe_gemm.available(device):
        raise UserError(f"method.kernel = \"triton\" needs a GPU with Triton (or TRITON_INTERPRET=1 on the CPU, "
                        f"slowly); this run is on {device.type}: set method.kernel = \"auto\"")


class Plan(NamedTuple):
    """Where each of a routing's N*k assignments goes (layouts: `kernels.moe_gemm`). int32 or int64 indices."""
    order: torch.Tensor  # [N*k] slot of sorted row r
    inverse: torch.Tensor  # [N*k] sorted row of slot s
    offs: torch.Tensor  # [E] int32 group ends
    sorted_ids: torch.Tensor  # [N*k] expert of sorted row r
    slot_ids: torch.Tensor  # [N*k] expert of slot s
    k: int

    def sorted_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Token rows x [N, K] copied into sorted order [N*k, K]."""
        return GatherRows.apply(x, self.order // self.k, self.inverse, self.k)

    def input(self, x: torch.Tensor, kernel: str) -> tuple[torch.Tensor, bool]:
        """(rows, gather) for the first expert GEMM of token rows x: the triton kernels gather inside the GEMM;
        the others get a sorted copy, made once however many GEMMs read it."""
        return (x, True) if kernel == "triton" else (self.sorted_rows(x), False)


def routing_plan(expert_ids: torch.Tensor, num_experts: int, fused: bool) -> Plan:
    """The plan of token choice routing `expert_ids` [N, k]: by the counting-sort kernel (`fused`), or by a stable
    sort of the N*k ids (8-bit keys when E <= 256: one radix pass)."""
    N, k = expert_ids.shape
    slot_ids = expert_ids.reshape(-1)
    if fused:
        order, inverse, offs, sorted_ids = moe_gemm.routing_plan(expert_ids, num_experts)
        return Plan(order, inverse, offs, sorted_ids, slot_ids, k)
    key_dtype = torch.uint8 if num_experts <= 256 else torch.int32
    sorted_ids, order = slot_ids.to(key_dtype).sort(stable=True)
    offs = torch.searchsorted(
        sorted_ids, torch.arange(num_experts, device=expert_ids.device, dtype=key_dtype), right=True,
        out_int32=True,
    )
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return Plan(order, inverse, offs, sorted_ids.long(), slot_ids, k)


def expert_linear(x: torch.Tensor, w: torch.Tensor, plan: Plan, kernel: str, *, gather: bool,
                  scatter: bool) -> torch.Tensor:
    """Each assignment's row times its expert's w[e] ([E, K, N], any strides). `gather`: x holds token rows (else
    sorted rows); `scatter`: return slot rows (else sorted rows)."""
    if kernel == "triton":
        return moe_gemm.expert_gemm(x, w, plan.order, plan.offs, plan.k, gather=gather, scatter=scatter)
    if gather:
        x = plan.sorted_rows(x)
    y = group_gemm(x, w, plan.offs, kernel == "grouped_mm")
    return GatherRows.apply(y, plan.inverse, plan.order, 1) if scatter else y


def biased_rows(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, plan: Plan, kernel: str, *,
                gather: bool) -> torch.Tensor:
    """row @ w[e] + bias[e] for every assignment of `plan`, sorted rows out (bias [E, N] or None). The bias is added
    in fp32 (the sum promotes): its gradient, a sum over many rows, then accumulates in fp32 too, as a dense Linear's
    does."""
    h = expert_linear(x, w, plan, kernel, gather=gather, scatter=False)
    return h if bias is None else h + bias.float().index_select(0, plan.sorted_ids)


def activated_rows(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, plan: Plan, kernel: str,
                   activation: str, *, gather: bool) -> torch.Tensor:
    """activate(row @ w[e] + bias[e]) in x's dtype for every assignment of `plan`, sorted rows out. Forward-only
    passes through the Triton kernels apply bias and activation in the GEMM's epilogue (`moe_gemm.EPILOGUES`: the
    pre-activation is never written); otherwise the GEMM, then a pass for them."""
    if kernel == "triton" and activation in moe_gemm.EPILOGUES and not torch.is_grad_enabled():
        return moe_gemm.expert_gemm_activated(x, w, plan.order, plan.offs, plan.k, gather=gather, bias=bias,
                                              activation=activation)
    return activate(biased_rows(x, w, bias, plan, kernel, gather=gather), activation).to(x.dtype)


def output_rows(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, plan: Plan, kernel: str,
                weights: torch.Tensor | None = None, *, unit: bool = False) -> torch.Tensor:
    """The second expert GEMM: a[r] @ w[e] + bias[e] for the sorted rows a (bias [E, N] or None, added in fp32).
    Slot rows [N*k, N] out; or, given the router's `weights` [N, k], each token's k rows weighted and summed,
    token rows [N, N] (fp32 where a bias or the Triton kernels made them so). The Triton kernels run GEMM and
    combine as one autograd unit (`moe_gemm.expert_output`: no slot rows kept for the backward) except where a bias
    needs its gradient; `unit`: every weight is exactly 1 (straight-through gates), which spares the kernels the
    products by the weights (the same result)."""
    if weights is not None and kernel == "triton" and (bias is None or not torch.is_grad_enabled()):
        return moe_gemm.expert_output(a, w, plan.order, plan.offs, plan.k, weights.flatten().contiguous(), bias=bias,
                                      unit=unit)
    y = expert_linear(a, w, plan, kernel, gather=False, scatter=True)
    if bias is not None:
        y = y + bias.float().index_select(0, plan.slot_ids)
    if weights is None:
        return y
    y = y.view(*weights.shape, -1)
    return (y * weights.to(y.dtype).unsqueeze(-1)).sum(dim=1)


def dispatch(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int,
             expert_rows, kernel: str) -> torch.Tensor:
    """sum_j weights[:, j] * expert_{expert_ids[:, j]}(x) for rows x [N, d]: plan the N*k assignments and run
    `expert_rows(x, plan, kernel, weights)` (token rows in, each token's k results weighted and summed: [N, d]
    out, by `output_rows`). Shared by every MoE layout (stacked experts here, SSD's views of a dense FFN)."""
    fused = kernel == "triton" or (x.device.type == "cuda" and moe_gemm.available(x.device))
    plan = routing_plan(expert_ids, num_experts, fused)
    return expert_rows(x.to(compute_dtype(x)), plan, kernel, weights)


class MoEFFN(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_expert: int,
        experts: int,
        top_k: int,
        activation: str,
        *,
        bias: bool = False,
        router: str = "softmax_then_topk",
        renormalize: bool = True,
        capacity_factor: float = 0.0,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.001,
        init_std: float = 0.02,
        out_std: float = 0.02,
    ):
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}")
        self.d_model, self.d_expert, self.num_experts, self.top_k = d_model, d_expert, experts, top_k
        self.activation = activation
        self.n_in = d_expert * (2 if activation == "swiglu" else 1)
        self.router_type, self.renormalize = router, renormalize
        self.capacity_factor = capacity_factor  # token choice: 0 = dropless; expert choice: must be > 0
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.kernel = "auto"  # how the expert GEMMs run (`KERNELS`); "loop" is the reference the tests compare with

        self.router = nn.Linear(d_model, experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(experts, d_model, self.n_in))
        self.w_out = nn.Parameter(torch.empty(experts, d_expert, d_model))
        self.in_bias = nn.Parameter(torch.empty(experts * self.n_in)) if bias else None
        self.out_bias = nn.Parameter(torch.empty(experts * d_model)) if bias else None
        self.reset_parameters(init_std, out_std)

        # Set by every forward: the weighted loss of the step (with gradient), its parts, and the routing, for
        # `stats`. `balance` = (assignment counts [E], mean router probabilities [E] with gradient), so that a
        # caller that sees several ranks can count f_e over all of them (upcycle.Upcycle.aux_loss).
        self.aux_loss: torch.Tensor | None = None
        self.z_part: torch.Tensor | None = None
        self.balance: tuple[torch.Tensor, torch.Tensor] | None = None
        self.routing: dict[str, torch.Tensor | None] | None = None

    @torch.no_grad()
    def reset_parameters(self, init_std: float = 0.02, out_std: float = 0.02):
        """A fresh MoE (training from scratch, or a shape to load an upcycled checkpoint into)."""
        nn.init.normal_(self.router.weight, 0.0, init_std)
        nn.init.normal_(self.w_in, 0.0, init_std)
        nn.init.normal_(self.w_out, 0.0, out_std)
        for b in (self.in_bias, self.out_bias):
            if b is not None:
                nn.init.zeros_(b)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_expert={self.d_expert}, experts={self.num_experts}, "
                f"top_k={self.top_k}, router={self.router_type}, capacity_factor={self.capacity_factor}")

    def capacity(self, num_tokens: int) -> int:
        """C = capacity_factor * tokens * k / E, at least 1, at most all tokens."""
        c = math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)
        return max(1, min(num_tokens, c))

    # --- the two steps ------------------------------------------------------------------------------------------
    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[N, E], fp32 for the softmax and top-k. The GEMM runs in x's dtype: an fp32 copy of x would cost a full
        pass over the activations."""
        return F.linear(x, self.router.weight.to(x.dtype)).float()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token choice: expert_ids [N, k], weights [N, k] (0 for assignments over capacity). Records the step's
        loss and what its statistics need."""
        logits = self.router_logits(x)
        expert_ids, weights, probs = token_choice(logits, self.top_k, self.router_type, self.renormalize)
        keep = None
        if self.capacity_factor > 0:
            keep = capacity_keep(expert_ids, self.num_experts, self.capacity(x.shape[0]))
            weights = weights * keep
        self._record(logits, probs, expert_ids=expert_ids, keep=keep)
        return expert_ids, weights

    def experts(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_j weights[:, j] * expert_{expert_ids[:, j]}(x): [N, d] in the compute dtype."""
        kernel = choose_kernel(self, compute_dtype(x), x.device)
        return dispatch(x, expert_ids, weights, self.num_experts, self.expert_rows, kernel)

    def expert_rows(self, x: torch.Tensor, plan: Plan, kernel: str, weights: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """The expert MLP of token rows x for every assignment of `plan`: slot rows [N*k, d]; given the router's
        `weights` [N, k], each token's rows weighted and summed, [N, d] (`output_rows`)."""
        dtype = x.dtype
        x, gather = plan.input(x, kernel)
        in_bias = None if self.in_bias is None else self.in_bias.view(self.num_experts, -1)
        a = activated_rows(x, self.w_in.to(dtype), in_bias, plan, kernel, self.activation, gather=gather)
        out_bias = None if self.out_bias is None else self.out_bias.view(self.num_experts, -1)
        return output_rows(a, self.w_out.to(dtype), out_bias, plan, kernel, weights)

    def grouped_mm_ok(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Grouped GEMMs need bf16 (any dtype in CPU eager) and row strides of a multiple of 16 bytes."""
        if grouped_mm is None:
            return False
        if dtype != torch.bfloat16 and (device.type != "cpu" or torch.compiler.is_compiling()):
            return False
        align = 16 // torch.empty((), dtype=dtype).element_size()
        return all(n % align == 0 for n in (self.d_model, self.n_in, self.d_expert))

    def expert_choice_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert takes exactly C tokens: gather [E, C, d], two batched matmuls, weighted index_add back
        (in fp32: a token may be taken by several experts)."""
        logits = self.router_logits(x)
        token_ids, weights, probs = expert_choice(logits, self.capacity(x.shape[0]))
        self._record(logits, probs, token_ids=token_ids)
        dtype = compute_dtype(x)
        E = self.num_experts
        h = torch.bmm(x.to(dtype)[token_ids], self.w_in.to(dtype))  # [E, C, n_in]
        if self.in_bias is not None:
            h = h + self.in_bias.to(dtype).view(E, 1, -1)
        y = torch.bmm(activate(h, self.activation), self.w_out.to(dtype))
        if self.out_bias is not None:
            y = y + self.out_bias.to(dtype).view(E, 1, -1)
        y = y.float() * weights.unsqueeze(-1)
        out = x.new_zeros(x.shape, dtype=torch.float)
        return out.index_add(0, token_ids.reshape(-1), y.reshape(-1, self.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        x2 = x.reshape(B * T, d)
        if self.router_type == "expert_choice":
            y = self.expert_choice_forward(x2)
        else:
            y = self.experts(x2, *self.route(x2))
        return y.to(x.dtype).view(B, T, d)

    # --- losses and statistics ------------------------------------------------------------------------------------
    def _record(self, logits, probs, expert_ids=None, token_ids=None, keep=None):
        """Set the step's weighted loss (with gradient) and keep, detached, what `stats` needs: the statistics
        are computed only when asked for (log steps), not every step."""
        self.z_part = self.z_loss_coef * router_z_loss(logits) if self.z_loss_coef > 0 else logits.new_zeros(())
        aux, self.balance = self.z_part, None
        if self.aux_loss_coef > 0 and expert_ids is not None:
            self.balance = (expert_counts(expert_ids, self.num_experts), probs.mean(dim=0))
            aux = aux + self.aux_loss_coef * balance_loss(self.balance[1], self.balance[0])
        self.aux_loss = aux
        self.routing = {"logits": logits.detach(), "expert_ids": expert_ids, "token_ids": token_ids, "keep": keep}

    @torch.no_grad()
    def stats(self) -> dict[str, torch.Tensor]:
        """Statistics of the last forward, as tensors: per-expert share of the assignments (`load`, the router's
        choice before capacity drops), `dropped` (share of token choice assignments over capacity; for expert
        choice, share of tokens no expert took), router `entropy`, unweighted `lb_loss` and `z_loss`."""
        r = self.routing
        logits = r["logits"]
        probs = logits.softmax(dim=-1)
        zero = logits.new_zeros(())
        if r["expert_ids"] is not None:
            counts = expert_counts(r["expert_ids"], self.num_experts)
            dropped = 1.0 - r["keep"].float().mean() if r["keep"] is not None else zero
        else:
            token_ids = r["token_ids"]
            counts = torch.full((self.num_experts,), float(token_ids.shape[1]), device=logits.device)
            picked = torch.zeros(logits.shape[0], device=logits.device).index_fill_(0, token_ids.reshape(-1), 1.0)
            dropped = 1.0 - picked.mean()
        return {
            "load": counts / counts.sum(),
            "dropped": dropped,
            "entropy": -(probs * logits.log_softmax(dim=-1)).sum(dim=-1).mean(),
            "lb_loss": load_balancing_loss(probs, counts),
            "z_loss": router_z_loss(logits),
        }


def moe_for(args: ModelArgs, *, experts: int, top_k: int, granularity: int = 1, router: str = "softmax_then_topk",
            renormalize: bool = True, capacity_factor: float = 0.0, aux_loss_coef: float = 0.01,
            z_loss_coef: float = 0.001) -> MoEFFN:
    """A fresh MoE layer that takes the place of a dense FFN of a model of `args`: experts of width
    d_ff / granularity, the model's activation and biases, the output projection initialised like the model's."""
    return MoEFFN(args.d_model, args.d_ff // granularity, experts, top_k, args.activation, bias=args.bias,
                  router=router, renormalize=renormalize, capacity_factor=capacity_factor,
                  aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef, out_std=0.02 / (2 * args.n_layer) ** 0.5)


def replace_ffns(model: Transformer, layers: list[int], make) -> None:
    """Put `make()` (a fresh MoE layer) in place of the FFN of each block in `layers`, on the FFN's device and
    dtype; blocks that already hold an MoE are left alone."""
    for i in layers:
        block = model.blocks[i]
        if isinstance(block.mlp, MoEFFN):
            continue
        w = block.mlp.fc.weight
        block.mlp = make().to(device=w.device, dtype=w.dtype)

