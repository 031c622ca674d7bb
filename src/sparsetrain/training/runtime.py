"""Where a run executes: the device and dtype, the process group under torchrun, and the wrapping of the model for
several processes (DDP or FSDP2) and compilation. Model code stays single-device; parallelism is applied here, from
outside, and the full (unsharded) model and optimizer state is gathered here for checkpoints."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sparsetrain.errors import UserError
from sparsetrain.methods import REGISTRY
from sparsetrain.nn.kernels import cross_entropy as loss_kernels
from sparsetrain.nn.model import Transformer

DDP_BUCKET_MB = 100

# bf16 dense peak per GPU, for MFU (datasheet numbers, no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # autocast dtype (fp32 = no autocast)
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def setup_runtime(tcfg) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = tcfg.device
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = cuda but no GPU is visible; use train.device = auto or cpu")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if tcfg.loss_kernel == "triton" and not loss_kernels.available(device):
        raise UserError(f"train.loss_kernel = \"triton\" needs a GPU with Triton (or TRITON_INTERPRET=1 on the CPU, "
                        f"slowly); this run is on {device.type}: set train.loss_kernel = \"auto\"")
    dtype = torch.bfloat16 if tcfg.dtype == "bf16" or (tcfg.dtype == "auto" and use_cuda) else torch.float32
    if tcfg.residual_dtype == "bf16" and dtype != torch.bfloat16:
        raise UserError(f"train.residual_dtype = bf16 needs bf16 autocast; this run computes in fp32 on "
                        f"{device.type}: set train.dtype = bf16, or train.residual_dtype = fp32")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device=device, dtype=dtype, rank=rank, world=world, local_rank=local_rank)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def use_cuda_graphs(tcfg, rt: Runtime, compile_model: bool, accum: int, method) -> bool:
    """Whether the compiled model replays as CUDA graphs (train.cuda_graphs). They need the compiled model on one
    GPU, one micro-batch a step (a replay overwrites the gradients an earlier micro-batch left to accumulate), and a
    method verified under them (`Method.cuda_graphs`). Under DDP only when asked for (`true`): each of the graph's
    pieces between gradient buckets replays, the all-reduces run between them (not yet measured enough for `auto`)."""
    one_process = not rt.distributed or (tcfg.parallel == "ddp" and tcfg.cuda_graphs == "true")
    fits = {"compiled": compile_model, "on a GPU": rt.device.type == "cuda", "in one process or DDP": one_process,
            "with one micro-batch a step": accum == 1,
            f"of a method run under them (method {method.name} is not yet)": method.cuda_graphs}
    if tcfg.cuda_graphs == "true" and not all(fits.values()):
        missing = ", ".join(k for k, ok in fits.items() if not ok)
        verified = ", ".join(name for name, cls in REGISTRY.items() if cls.cuda_graphs)
        raise UserError(f"train.cuda_graphs=true needs the model compiled, on a GPU, in one process or under DDP, "
                        f"with one micro-batch a step, and a method run under them ({verified}); this run is not "
                        f"{missing}. Set train.cuda_graphs=auto (on where it applies) or false")
    return tcfg.cuda_graphs != "false" and all(fits.values())


def fsdp_units(blocks: list[torch.nn.Module], per_unit: int, whole_fits: bool = True) -> list[list[torch.nn.Module]]:
    """Consecutive blocks grouped into FSDP2 units of `per_unit`. 0 (auto): every block in one unit where the whole
    gathered model fits (`whole_fits`, `gathered_model_fits`), else a quarter of the blocks a unit, rounded up (four
    units at most). Each unit is one all-gather and one reduce-scatter, with the host's work of its hooks: fewer
    units cost less host time (one unit: the model compiled whole), more hold fewer gathered weights at once."""
    n = len(blocks)
    if per_unit <= 0:
        per_unit = n if whole_fits else -(-n // 4)
    return [blocks[i:i + per_unit] for i in range(0, n, per_unit)]


def gathered_model_fits(model: torch.nn.Module, rt: Runtime) -> bool:
    """Whether one FSDP2 unit of the whole model fits: its gathered weights and their gradients in the compute dtype
    and the fp32 copy the gradients are reduced in, within a quarter of the GPU's memory (the rest for the shards,
    AdamW's moments and the activations). Off a GPU (gloo), yes."""
    if rt.device.type != "cuda":
        return True
    per_param = 2 * rt.dtype.itemsize + 4
    gathered = per_param * sum(p.numel() for p in model.parameters())
    return gathered <= torch.cuda.get_device_properties(rt.device).total_memory / 4


def parallelize(model: Transformer, rt: Runtime, tcfg, compile_model: bool, cuda_graphs: bool = False,
                static_shapes: bool = False) -> torch.nn.Module:
    """Wrap for several processes (DDP or FSDP2) and compile; the raw model stays what methods see. `cuda_graphs`
    (one process, or DDP when asked for: `use_cuda_graphs`): the compiled forward and backward replay as CUDA graphs.
    `static_shapes` (`Method.static_shapes`): compiled without symbolic sizes.

    DDP is wrapped first and compiled around: dynamo then splits the graph at DDP's gradient buckets, so each
    bucket's all-reduce starts while the backward goes on. (Compiled first and wrapped, the whole backward is one
    autograd node and every all-reduce waits for its end.) FSDP2 shards groups of consecutive blocks
    (`train.fsdp_blocks_per_unit`, `fsdp_units`): one unit of every block, the model is compiled whole; several,
    each block and the output layer compiled."""
    dynamic = False if static_shapes else None  # None: static until a second shape arrives
    if compile_model:
        from torch import _dynamo

        # Methods change shapes and attributes between steps (kept subsets, phases): allow a few graphs.
        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
    if rt.distributed and tcfg.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32)
        units = fsdp_units(list(model.blocks), tcfg.fsdp_blocks_per_unit, gathered_model_fits(model, rt))
        if len(units) == 1:
            # One unit of every block: the model is sharded at its root alone, so no FSDP2 hook runs between blocks
            # and the forward compiles whole, one graph as on one GPU (the hooks, around it, stay eager).
            units = []  # no unit below the root
            if compile_model:
                model.forward = torch.compile(model.forward, dynamic=dynamic)
        elif compile_model:
            # FSDP2's hooks around each unit's blocks would break a whole-model graph there: compiled block by block.
            for block in model.blocks:
                block.compile(dynamic=dynamic)
            # The output layer's loss compiled too: eager, it would materialise fp32 logits (vocab x tokens).
            model.output = torch.compile(model.output, dynamic=dynamic)
        for i, unit in enumerate(units):
            # The last unit's weights are needed again at once by the backward: kept gathered (one all-gather less).
            # The others too with train.fsdp_reshard_after_forward = false: no all-gathers in the backward, at the
            # memory of the whole gathered model between forward and backward.
            keep = not tcfg.fsdp_reshard_after_forward or i == len(units) - 1
            fully_shard(unit if len(unit) > 1 else unit[0], mp_policy=mp, reshard_after_forward=not keep)
        fully_shard(model, mp_policy=mp)
        model.register_forward_hook(_reshard_after_forward_only)
        return model
    if not rt.distributed:
        if compile_model:
            model.compile(mode="reduce-overhead" if cuda_graphs else None, dynamic=dynamic)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Gradients live in the all-reduce buckets (no copy in or out); 100 MB buckets: a few large all-reduces.
    wrapped = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                  bucket_cap_mb=DDP_BUCKET_MB, gradient_as_bucket_view=True)
    if not compile_model:
        return wrapped
    return torch.compile(wrapped, mode="reduce-overhead" if cuda_graphs else None, dynamic=dynamic)


def _reshard_after_forward_only(model: torch.nn.Module, args, output) -> None:
    """A forward without autograd (evaluation, a method's probe) has no backward to reshard the weights FSDP2 kept
    gathered: reshard them here, or a method that then edits the sharded weights (SSD's permutation, MST's topology)
    would leave the next forward reading stale gathered copies."""
    if not torch.is_grad_enabled():
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def no_grad_sync(wrapped: torch.nn.Module, model: Transformer, rt: Runtime, tcfg, last: bool):
    """Skip the gradient all-reduce (FSDP2: reduce-scatter) on all but the last micro-batch of an accumulation."""
    if not rt.distributed:
        return contextlib.nullcontext()
    if tcfg.parallel == "fsdp":
        # A flag, not a context: it must be on again before the last backward, or nothing is reduced this step.
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    ddp = getattr(wrapped, "_orig_mod", wrapped)  # compiled around DDP: the DDP module inside
    return contextlib.nullcontext() if last else ddp.no_sync()


def model_state(model: torch.nn.Module, rt: Runtime) -> dict[str, torch.Tensor]:
    if rt.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def optimizer_state(model: torch.nn.Module, optimizer, rt: Runtime) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=rt.distributed))


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
