"""SSD: switchable sparse-dense learning (ICML 2024). Train dense; when the FFN activation pattern is stable, train
each FFN as a Mixture-of-Experts cut out of its own neurons (MoEfication); switch back to dense; repeat.

The MoE is the dense FFN, permuted. A switch to sparse clusters every FFN's d_ff neurons into E experts of
f = d_ff / E, then permutes the neurons in place so that expert e is neurons e*f .. (e+1)*f - 1: the rows of `fc`
(gate and up rows together for SwiGLU: the authors' code permuted only one of them, a bug), its bias, the columns
of `proj`, and the AdamW moments of all three. The sparse phase then computes with views of those same dense
parameters (`SSDFFN`): `fc.weight.view(E, f, d)` and `proj.weight.view(d, E, f)`, transposed into the [E, K, N]
layout of the grouped GEMMs, so gradients land in the dense parameters and the optimizer does not know about
experts. SwiGLU's gate and up blocks cannot form one [E, d, 2f] view, so they take two grouped GEMMs (the same
FLOPs, no copy). Switching back to dense costs nothing: a dense FFN with permuted neurons is the same function.

Pieces (one module each: options, cluster, ffn, monitor, method, moefy):
- Clustering: balanced spherical k-means (every expert gets exactly f neurons) on the L2-normalised input rows
  (the gate rows for SwiGLU: the gate decides whether a neuron fires), or on the neurons' binary firing patterns
  over the probe tokens (co-activation: the cosine of two patterns is their co-firing count over the geometric
  mean of their firing counts). Re-clustering runs from the previous centroids and from a fresh seeded start and
  keeps the one with the higher mean within-cluster similarity.
- Router: centroid-based by default. Expert e's router vector is the mean of its neurons' normalised input rows,
  fixed from the switch until the next one; score = x . centroid; each token takes its top-k experts. `router =
  "trained"`: at each switch a linear router per layer is fitted (from the centroids, `router_steps` Adam steps) to
  where the probe tokens' activation mass is, and used instead (no gradient from the training loss). Gating is
  straight-through: the selected experts' outputs are summed unweighted (the sparse FFN is the dense FFN restricted
  to their neurons), and g = 1 + s - s.detach(), s the softmax over the top-k scores, carries a gradient into the
  router's input (`router_grad`; the router has no parameters of its own to train).
- Monitor: every `monitor_every` steps (a light re-clustering: `monitor_iters` k-means iterations from the last
  check's centroids; the full one runs at each switch), on a fixed probe batch (the first sequences of the first
  training batch), per layer: activation sparsity (exact zeros for relu / relu2, |a| <= activation_threshold for
  gelu / swiglu), the adjusted Rand index between this clustering and the previous check's (neurons tracked through
  permutations), and the share of activation mass (sum of |a|) that the top-k experts hold, for the best k experts
  of each token (`mass`: how well the clustering can do) and for the router's choice (`router_mass`: what the
  sparse phase keeps).
- Policy: `adaptive` stays dense until the monitor sees a stable pattern (mean ARI >= stable_ari and mean router
  mass >= stable_mass) after at least `dense_span` dense steps, then trains sparse for `sparse_span` steps, and
  repeats; the last `final_fraction` of training runs in `final_phase`. `fixed` runs sparse in given [start, end)
  fractions of training (ablations). Every sparse phase starts with a fresh clustering.
- Sparse steps compute only the chosen experts (grouped GEMMs over their rows), and experts that no token chose on
  a step keep their weights and AdamW moments (`freeze_unrouted`; AdamW would move them by momentum and decay).
  Evaluation during training is dense. FLOPs per token follow the phase (k/E of the FFN plus the router); the
  monitor's probe passes and clusterings are counted in `ssd_overhead_flops`.
- Sparse inference: `moefy.run_as_moe` runs any dense model as an MoE (the `convert moefy` / `convert densify`
  commands write permuted / original-order model folders; `generate --moe K` samples text from it).

The method swaps the FFNs for `SSDFFN`s in `start()`, not `setup()`: a model loaded for evaluation or export stays
a plain dense Transformer (its neurons in the run's last layout, the same function). The probe batch is taken by a
one-shot forward pre-hook on the model, so the trainer needs no extra hook.

Distributed: the probe is broadcast from rank 0, and so are the clusterings and the monitor's numbers, so every rank
permutes and switches alike. Under FSDP2 (`shards`) the clustering reads each layer's gathered `fc` rows, a switch
permutes the gathered rows and keeps each process's shard, the probe runs through FSDP2's hooks, and the sparse
forward takes its expert views of the weights FSDP2 gathered for the block.
"""
from sparsetrain.methods.ssd.method import SSD
from sparsetrain.methods.ssd.options import SSDOptions

__all__ = ["SSD", "SSDOptions"]
