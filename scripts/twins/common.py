"""Shared helpers of the PyTorch twins: MNIST idx reader, seeding, JSON-line logs.

The twins are the PyTorch versions of ensueno's training recipes, trained on
the same data, so that losses and seconds per epoch can be compared.
"""

import argparse
import gzip
import json
import os
import struct
import sys
import time

import numpy as np
import torch


def read_idx(path):
    """Reads an idx file (optionally gzip-compressed) into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims}, got {arr.size} bytes")
    return arr.reshape(dims)


def _find(root, stem):
    for name in (stem, stem + ".gz"):
        p = os.path.join(root, name)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(os.path.join(root, stem + "[.gz]"))


def load_mnist(root, split):
    """Returns (images uint8 [N, 28, 28], labels int64 [N]) of `train` or `test`."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def base_parser(description, epochs, batch_size, lr):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", default="/work/shared/data/mnist")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-steps-per-epoch", type=int, default=0, help="0 = whole epoch")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    return p


def setup(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)


def batches(n, batch_size, generator, max_steps):
    """Shuffled index batches of one epoch (the last partial batch kept, as Keras)."""
    perm = torch.randperm(n, generator=generator)
    steps = 0
    for start in range(0, n, batch_size):
        if max_steps and steps >= max_steps:
            break
        steps += 1
        yield perm[start : start + batch_size]


class EpochLog:
    """Accumulates per-step scalars and prints one JSON line per epoch."""

    def __init__(self, epoch):
        self.epoch = epoch
        self.sums = {}
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, **scalars):
        self.steps += 1
        for k, v in scalars.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def emit(self, **extra):
        line = {"epoch": self.epoch, "steps": self.steps}
        line.update({k: v / max(self.steps, 1) for k, v in self.sums.items()})
        line["seconds"] = round(time.perf_counter() - self.start, 3)
        line.update(extra)
        print(json.dumps(line), flush=True)
        return line


def log_start(name, args, **extra):
    info = {"twin": name, "torch": torch.__version__, "threads": torch.get_num_threads()}
    info.update({k: v for k, v in vars(args).items()})
    info.update(extra)
    print(json.dumps(info), flush=True)
    sys.stdout.flush()
