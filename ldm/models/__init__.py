"""The networks and how they are stored: KL-VAE, UNet and their shared blocks, ControlNet, LoRA adapters, the
frozen text encoder, size presets, and the config.json + safetensors format every saved model uses."""
