"""Training: the optimizer and LR schedule every training uses, checkpoints and resumption, data
parallelism, the loss history, and one module per trained model (VAE, UNet, LoRA, ControlNet)."""
