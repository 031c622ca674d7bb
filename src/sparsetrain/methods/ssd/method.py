"""The SSD method: dense and sparse phases chosen by the monitor (or fixed windows), a switch to sparse clusters and
permutes every FFN, the sparse steps compute the chosen experts only and freeze the experts nobody chose."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from sparsetrain.errors import UserError
from sparsetrain.methods.base import Method, RunInfo
from sparsetrain.methods.frozen import FrozenSlices
from sparsetrain.methods.ssd.cluster import contiguous_labels
from sparsetrain.methods.ssd.ffn import SSDFFN, permute_ffn_, router_centroids, ssd_layers
from sparsetrain.methods.ssd.monitor import Check, Monitor
from sparsetrain.methods.ssd.options import SSDOptions, check_options, resolve_top_k
from sparsetrain.nn.model import ModelArgs, Transformer, flops_per_token
from sparsetrain.nn.moe import check_kernel


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


class SSD(Method):
    name = "ssd"
    Options = SSDOptions
    cuda_graphs = True
    static_shapes = True  # its MoE phase as upcycle's (see there)

    def __init__(self, options: SSDOptions, args: ModelArgs, seq_len: int):
        super().__init__(options, args, seq_len)
        o = options
        self.top_k = resolve_top_k(o)
        self.monitor = Monitor(o.experts, self.top_k, threshold=o.activation_threshold, cluster=o.cluster,
                               iters=o.cluster_iters, light_iters=o.monitor_iters,
                               router_steps=o.router_steps if o.router == "trained" else 0, seed=o.seed)
        self.layers: list[SSDFFN] = []
        self.order: torch.Tensor | None = None  # [L, d_ff]: the original neuron at each position
        self.phase, self.phase_start, self.window, self.switches = "dense", 0, -1, 0
        self.probe: torch.Tensor | None = None
        self.last: Check | None = None
        self.check_step = self.reported_check = -1
        self.overhead = self.overhead_total = 0.0  # FLOPs: not yet in flops_per_token / all of them
        self._probe_hook = None
        self._frozen: FrozenSlices | None = None  # holds unrouted experts through the optimizer step

    @classmethod
    def validate(cls, options: SSDOptions, args: ModelArgs, seq_len: int) -> None:
        check_options(options, args)

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def start(self, model: Transformer, optimizer: torch.optim.Optimizer, run: RunInfo) -> None:
        super().start(model, optimizer, run)
        self.layers = ssd_layers(model)
        device = self.layers[0].fc.weight.device
        check_kernel(self.options.kernel, device)
        for m in self.layers:
            m.kernel = self.options.kernel
        self._frozen = FrozenSlices(optimizer, compiled=device.type == "cuda")
        if self.order is None:
            self.order = torch.arange(self.args.d_ff, device=device).repeat(self.args.n_layer, 1)
        if self.probe is None and self._probe_hook is None:
            self._probe_hook = model.register_forward_pre_hook(self._capture_probe)

    @torch.compiler.disable
    def _capture_probe(self, module, inputs) -> None:
        """Forward pre-hook, removed after its first call: keep the first sequences of the first batch the model
        sees (rank 0's, on every rank) as the monitor's probe."""
        probe = inputs[0][: self.options.probe_sequences].detach().clone()
        if self.run.distributed:
            dist.broadcast(probe, 0)
        self.probe = probe
        self._probe_hook.remove()
        self._probe_hook = None

    # --- policy -------------------------------------------------------------------------------------------------
    def decide(self, step: int) -> tuple[str, int]:
        """The phase of `step` and, for the fixed schedule, its sparse window (-1 = none)."""
        o, T = self.options, self.total_steps
        if o.schedule == "fixed":
            for w, (a, b) in enumerate(o.sparse_windows):
                if round(a * T) <= step < round(b * T):
                    return "sparse", w
            return "dense", -1
        if step >= round((1 - o.final_fraction) * T):
            return o.final_phase, -1
        if self.phase == "sparse":
            return ("sparse" if step - self.phase_start < o.sparse_span else "dense"), -1
        return ("sparse" if step - self.phase_start >= o.dense_span and self.stable() else "dense"), -1

    def stable(self) -> bool:
        """The last check, made in this dense phase, saw a stable pattern."""
        c = self.last
        if c is None or self.check_step < self.phase_start:
            return False
        ari, mass = c.mean("ari"), c.mean("router_mass")
        return ari is not None and mass is not None and ari >= self.options.stable_ari \
            and mass >= self.options.stable_mass

    # --- per step -----------------------------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        phase, window = self.decide(step)
        if phase == "sparse" and (self.phase == "dense" or window != self.window):
            self.switch_to_sparse(step, window)
        elif phase == "dense" and self.phase == "sparse":
            self.switch_to_dense(step)
        if self.phase == "sparse":
            for m in self.layers:
                m.load.zero_()

    def switch_to_sparse(self, step: int, window: int = -1) -> None:
        """Re-cluster in full (warm and fresh starts), lay every FFN out expert by expert (weights and moments),
        and route with the new centroids (or the routers the check fitted: `router = "trained"`, when there was a
        probe to fit them on)."""
        self.run_check(step)
        E = self.options.experts
        for i, m in enumerate(self.layers):
            order = self.monitor.positions(i, self.order[i]).argsort(stable=True)
            permute_ffn_(m, order, self.optimizer)
            self.order[i] = self.order[i][order]
            router = self.monitor.routers[i]  # expert e is label e, before and after the permutation
            if router is None:
                router = router_centroids(m, contiguous_labels(m.d_ff, E, order.device), E)
            m.set_sparse(E, self.top_k, router, self.options.router_grad)
        self.phase, self.phase_start, self.window = "sparse", step, window
        self.switches += 1

    def switch_to_dense(self, step: int) -> None:
        for m in self.layers:
            m.sparse = False
        self.phase, self.phase_start, self.window = "dense", step, -1

    def run_check(self, step: int, light: bool = False) -> None:
        """A monitor check at `step` (before that step's update); on the probe when there is one yet."""
        # Without a probe yet (a sparse window from step 0) the clustering uses the weights.
        check = self.monitor.check(self.model, self.probe, self.order, light=light)
        if self.run.distributed:
            check = self._same_on_all_ranks(check)
        self.last, self.check_step = check, step
        self.overhead += check.flops
        self.overhead_total += check.flops

    def _same_on_all_ranks(self, check: Check) -> Check:
        """Rank 0's clustering and numbers, so that every rank permutes and switches alike."""
        for t in self.monitor.labels + self.monitor.centroids + [r for r in self.monitor.routers if r is not None]:
            dist.broadcast(t, 0)
        packed = torch.tensor([[math.nan if v is None else v for v in getattr(check, k)] for k in Check.KEYS],
                              device=self.order.device)
        dist.broadcast(packed, 0)
        values = {k: [None if math.isnan(v) else v for v in row] for k, row in zip(Check.KEYS, packed.tolist())}
        return Check(**values, flops=check.flops)

    # --- only the chosen experts are updated -------------------------------------------------------------------
    def before_optimizer(self, step: int) -> None:
        """Experts no token chose this step have zero gradients, but AdamW would still move them (momentum, weight
        decay): their rows and columns are held (`frozen.FrozenSlices`: AdamW's update under a keep mask on a
        GPU, no host sync; the stash where the mask does not apply)."""
        if self.phase != "sparse" or not self.options.freeze_unrouted:
            return
        loads = torch.stack([m.load for m in self.layers])
        if self.run.distributed:
            dist.all_reduce(loads)
        f = self.args.d_ff // self.options.experts
        with torch.no_grad():
            keeps = (loads > 0).repeat_interleave(f, dim=1)  # [L, d_ff], one entry per neuron: one kernel for all
            if self.args.activation == "swiglu":
                keeps = torch.cat([keeps, keeps], dim=1)  # fc's rows: [gate | up]
            for keep_rows, m in zip(keeps, self.layers):
                keep = keep_rows[: self.args.d_ff]
                for p, dim, k in [(m.fc.weight, 0, keep_rows), (m.fc.bias, 0, keep_rows), (m.proj.weight, 1, keep)]:
                    if p is not None:
                        self._frozen.freeze(p, dim, None, k)
        self._frozen.before_step()

    def after_optimizer(self, step: int) -> None:
        self._frozen.after_step()  # nothing to do where nothing was held
        every = self.options.monitor_every
        if every and (step + 1) % every == 0 and self.probe is not None:
            self.run_check(step + 1, light=True)

    def before_eval(self) -> None:
        """Evaluate the dense model (what training produces), also in a sparse phase."""
        if self.phase == "sparse":
            for m in self.layers:
                m.sparse = False

    def after_eval(self) -> None:
        if self.phase == "sparse":
            for m in self.layers:
                m.sparse = True

    # --- accounting ---------------------------------------------------------------------------------------------
    def phase_flops_per_token(self, phase: str) -> float:
        """Training FLOPs per token in a phase: a sparse FFN computes k of E experts, plus the router GEMM."""
        if phase == "dense":
            return self.dense_flops_per_token()
        a, E = self.args, self.options.experts
        parts = flops_per_token(a, self.seq_len)
        ffn = parts["ffn"] * self.top_k / E + a.n_layer * 2 * a.d_model * E
        return 3 * (sum(parts.values()) - parts["ffn"] + ffn)

    def flops_per_token(self, step: int) -> float:
        """The phase of the step just taken, plus the overhead since the last call spread over the step's tokens
        (when the run's tokens per step are known)."""
        flops = self.phase_flops_per_token(self.phase)
        if self.run.tokens_per_step:
            flops += self.overhead / self.run.tokens_per_step
            self.overhead = 0.0
        return flops

    def metrics(self, step: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ssd_phase": self.phase,
            "ssd_switches": self.switches,
            "ssd_flops_saved": 1 - self.phase_flops_per_token(self.phase) / self.dense_flops_per_token(),
            "ssd_overhead_flops": self.overhead_total,
        }
        if self.last is not None and self.check_step != self.reported_check:
            # Each check once: per-layer lists and their means.
            self.reported_check = self.check_step
            out["ssd_check_step"] = self.check_step
            for key in Check.KEYS:
                out[f"ssd_{key}"] = self.last.mean(key)
                out[f"ssd_{key}_layers"] = [None if v is None else round(v, 4) for v in getattr(self.last, key)]
        return out

    def final_note(self) -> str | None:
        if self.switches:
            return None
        o, T = self.options, self.total_steps
        head = f"SSD never switched to sparse (ssd_switches = 0 in {T} steps): every step trained the dense model"
        if o.schedule == "fixed":
            return f"{head}; method.sparse_windows={o.sparse_windows} hold no step of {T}"
        c = self.last
        if c is None:
            return (f"{head}; the monitor never checked (method.monitor_every={o.monitor_every}): the adaptive "
                    "schedule goes sparse only after a check sees a stable pattern")
        ari, mass = c.mean("ari"), c.mean("router_mass")
        seen = f"the last check (step {self.check_step}) saw mean ARI {_num(ari)} against method.stable_ari=" \
               f"{o.stable_ari} and top-{self.top_k} activation mass {_num(mass)} against method.stable_mass=" \
               f"{o.stable_mass}"
        if ari is None:
            return f"{head}; {seen} (the ARI compares two clusterings: one check is not enough; lower " \
                   "method.monitor_every or train longer)"
        if ari >= o.stable_ari and mass is not None and mass >= o.stable_mass:
            return (f"{head}; {seen}: stable, but too late (method.dense_span={o.dense_span} dense steps first, "
                    f"the last method.final_fraction={o.final_fraction} dense)")
        return f"{head}; {seen}: not stable enough (train longer, use relu/relu2, or lower the thresholds)"

    # --- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "experts": self.options.experts, "phase": self.phase, "phase_start": self.phase_start,
            "window": self.window, "switches": self.switches, "check_step": self.check_step,
            "reported_check": self.reported_check, "overhead": self.overhead, "overhead_total": self.overhead_total,
            "neuron_order": self.order.cpu(), "monitor": self.monitor.state_dict(),
        }
        if self.probe is not None:
            state["probe"] = self.probe.cpu()
        if self.phase == "sparse":
            state["router"] = torch.stack([m.centroids for m in self.layers]).cpu()
        if self.last is not None:
            state["last"] = self.last.as_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["experts"] != self.options.experts:
            raise UserError(f"this checkpoint's SSD run used method.experts={state['experts']}, the config says "
                            f"{self.options.experts}; resume with the same method options")
        device = self.layers[0].fc.weight.device
        self.phase, self.phase_start = state["phase"], int(state["phase_start"])
        self.window, self.switches = int(state["window"]), int(state["switches"])
        self.check_step, self.reported_check = int(state["check_step"]), int(state["reported_check"])
        self.overhead, self.overhead_total = float(state["overhead"]), float(state["overhead_total"])
        self.order = state["neuron_order"].to(device)
        self.monitor.load_state_dict(state["monitor"], device)
        self.probe = state["probe"].to(device) if "probe" in state else None
        if self.probe is not None and self._probe_hook is not None:  # start() waited for a probe: it is here
            self._probe_hook.remove()
            self._probe_hook = None
        last = state.get("last")
        self.last = Check(**{k: list(last[k]) for k in Check.KEYS}) if last else None
        for i, m in enumerate(self.layers):
            if self.phase == "sparse":
                m.set_sparse(self.options.experts, self.top_k, state["router"][i], self.options.router_grad)
            else:
                m.sparse = False
