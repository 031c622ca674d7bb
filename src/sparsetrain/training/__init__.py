"""Running training: the runtime (devices, process groups, DDP/FSDP2, compile), building the model and optimizer,
THE training step (`step.train_step`), and the loop (run folder, logging, evaluation, checkpoints, resume)."""
