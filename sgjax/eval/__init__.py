"""Evaluation: feature statistics, Fréchet distance, and the offline Fashion-MNIST metric."""
