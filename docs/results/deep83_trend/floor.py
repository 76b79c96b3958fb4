"""The floor of a 2,000-sample final: FD-FMNIST of real images (200 a class from the train
split, 5 draws) against the test statistics, judged by the run's cached classifier.

  JAX_PLATFORMS=cpu .venv/bin/python docs/results/deep83_trend/floor.py ~/sgjax-runs/deep83
"""

import sys

import numpy as np

from sgjax import config as config_lib
from sgjax.data import pipeline
from sgjax.eval import fmnist, frechet

config = config_lib.load_config_file("sgjax/configs/fashion_mnist_deep_trend.py")
clf, (mu, sigma), _ = fmnist.for_workdir(config.data, sys.argv[1])
images, labels = (np.asarray(a) for a in pipeline.load_split_arrays(config.data, "train"))
fds = []
for seed in range(5):
  rng = np.random.default_rng(seed)
  pick = np.concatenate([rng.choice(np.flatnonzero(labels == k), 200, replace=False)
                         for k in range(10)])
  fds.append(frechet.distance_of_features(
      np.asarray(fmnist.apply_in_batches(clf, images[pick])[0]), mu, sigma))
print("real images, 2,000 (200 a class) vs the test statistics: FD-FMNIST",
      " ".join(f"{v:.3f}" for v in fds), f"(mean {np.mean(fds):.3f})")
