"""Converters of outside weights into ours, every key checked both ways, and their loaders:
the SD-VAE from diffusers safetensors (`sd_vae`), official DiT/SiT checkpoints
(`dit_checkpoint`), the FID Inception from pytorch-fid (`inception_fid`). Weight loading lives
here, apart from the model definitions (sgjax.models, sgjax.eval.inception).
"""
