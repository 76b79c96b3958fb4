"""sgjax: token-sparse Diffusion Transformers and Sparse Guidance in JAX."""
