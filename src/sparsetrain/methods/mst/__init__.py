"""MST: mixed sparsity training. Dynamic sparse training under a three-phase sparsity schedule, with optional hybrid
sparse attention.

Schedule (fractions p of training; `sparsity` s, `final_sparsity` f):
    warm-up          p < warmup_end                  target ramps linearly from 0 (dense) to s
    ultra-sparse     warmup_end <= p < restore_start  target s
    restoration      p >= restore_start               target ramps linearly from s to f, reached at restore_end
The topology changes only at updates, every `update_every` (dT) steps and at the end of warm-up and of restoration
(so that the held levels are reached whatever dT is): the update after step u builds the topology for target(u),
which then holds until the next update (the first topology, before step 0, is target(0)). An update
prunes the smallest-magnitude active weights, a share zeta(u) = zeta/2 (1 + cos(pi u / (update_end T))) of them,
and grows as many by the largest dense-gradient magnitude (`rigl`), at random (`set`) or 3 parts gradient to 1 random
(`mixed`, the authors'). When the target rises it prunes more than it grows, when it falls it grows more, so that
after every update each layer holds exactly its target count.

Granularity `weight` (the paper's): boolean masks over the linear layers' weights (the token embedding and output
layer with `sparsify_embeddings`), layer densities by ERK (density proportional to (n_in + n_out) / (n_in n_out),
layers that would pass 1 made dense, as RigL) or uniform. A gradient hook masks every gradient as autograd delivers
it (so clipping and AdamW see a sparse gradient), and on update steps accumulates the dense gradient that growth
ranks; masked weights and their AdamW moments are zero and stay exactly zero. Regrown weights start at zero with zero
moments (the authors' code keeps stale moments there, a known source of loss spikes). The GEMMs here are dense
tensors with zeros, so this variant saves no time; `flops_per_token` counts what a sparse kernel would do: forward,
input gradient and weight gradient by each layer's density, except that the weight gradient is dense on the update
steps that grow by gradient (RigL's dense-gradient cost), and attention by the blocks FlexAttention computes.

Granularity `neuron` (ours): the units are FFN neurons and kv-head groups, the same target for every layer, and
the step computes with `index_select`ed weight slices (`FFN.active`, `Attention.active`), so the saving is
wall-clock. A pruned unit's output weights (its `proj` columns) are zeroed and its input weights kept, frozen, like
SAT's omitted slices (weights and moments stashed around `optimizer.step()`): an omitted unit then adds exactly zero,
so the sliced model and the dense model compute the same function, and a regrown unit starts from zero output
weights (function unchanged) with zero moments, its input weights where they were. Pruning ranks the L2 norm of a
unit's weights; growth ranks the L2 norm of its gradient, which for an omitted unit is the gradient of its zeroed
output weights. Gradients of omitted units exist only on a dense step, so update steps that grow by gradient run
dense (and count dense FLOPs; the omitted units' gradients then also enter that step's clipping norm).

Hybrid sparse attention (`attention` = local | strided | hybrid, see `attention_masks`): FlexAttention block masks on
the chosen layers for steps in [attention_start, attention_end) of training, causal SDPA elsewhere. FlexAttention has
no backward on CPU, so on CPU the same pattern runs as a dense boolean mask in SDPA (correct, not faster).

Defaults: sparsity 0.9, zeta 0.3, dT 100, mixed growth, ERK, the drop fraction decaying over the whole run, window and
stride 128 are the authors'; the phase boundaries (warm-up to 0.1, restoration from 0.75 to 0.9, dense after) are
ours (the paper gives none usable). Attention sparsity is off by default: at 128-token blocks a stride below 256
skips no block (`hybrid` with the authors' settings computes every causal block), and FlexAttention only beats
SDPA from about 4k tokens.

Under FSDP2 (`shards`): the neuron granularity runs as SAT does (the forward slices the gathered weights, unit norms
gather a vector per layer, each process freezes and zeroes its shard's part). The weight granularity keeps whole
masks on every process (one byte per masked weight: the price of simple updates) and applies each process's piece of
them to its shard; gradients are masked by a post-accumulate-grad hook on the sharded parameter (FSDP2 runs it after
the reduce-scatter, before clipping), and an update gathers one layer's weights and dense gradient at a time.
"""
from sparsetrain.methods.mst.method import MST, MSTOptions

__all__ = ["MST", "MSTOptions"]
