"""The model layer, single-device: the Transformer and its seams for sparsity (`active` index subsets, block masks,
a replaceable FFN), the Mixture-of-Experts layer, attention block masks, text sampling. Fast kernels go in
nn/kernels/ beside the pure-PyTorch reference they must equal."""
