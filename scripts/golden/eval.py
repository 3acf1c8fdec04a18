"""Golden fixtures for ensueno's evaluation tools (classifier and FID).

Run from the repository root:
    /root/venvs/ensueno/bin/python scripts/golden/eval.py

Writes crates/ensueno/tests/fixtures/eval/
  fid.safetensors
      two random feature sets a (200x32) and b (300x32) with different means and
      covariances, a rank-deficient pair c, d (10x32, 12x32: fewer samples than
      dimensions) and the reference Frechet distances fid_ab, fid_aa, fid_cd
      (f64, shape [1]). The reference is computed in float64 with
      torch.linalg.eigh (scipy is not installed in the venv): tr(S1) + tr(S2)
      - 2 tr((S1^1/2 S2 S1^1/2)^1/2), cross-checked against numpy's general
      eigenvalues of S1 @ S2 (the form behind scipy.linalg.sqrtm(S1 @ S2)).
  mnist_classifier.safetensors  (needs $ENSUENO_SHARED, default /work/shared)
      the first 16 digits of the MNIST test set (pixels / 255, [16,1,28,28]) with
      their labels, and the outputs of the shared MNIST classifier
      (weights/mnist-classifier/mnist.safetensors) loaded into an explicit torch
      model in eval mode: log_probs [16,10] and features [16,32] (the ReLU output
      of fc1). The model standardises its input first, (x - 0.1307) / 0.3081, as
      the weights were trained that way (99.17% accuracy; 58% on pixels/255). MNIST images: Yann LeCun, Corinna Cortes, Christopher Burges,
      CC BY-SA 3.0. Also prints the classifier's accuracy on all 10,000 test
      digits.
"""

import gzip
import json
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "crates", "ensueno", "tests", "fixtures", "eval")
SHARED = os.environ.get("ENSUENO_SHARED", "/work/shared")

META = {"torch": torch.__version__, "numpy": np.__version__}


def cov(x):
    x = x - x.mean(0, keepdim=True)
    return x.T @ x / (x.shape[0] - 1)


def frechet_torch(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = cov(a), cov(b)
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    m = root1 @ s2 @ root1
    m = (m + m.T) / 2
    tr_root = torch.linalg.eigvalsh(m).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * tr_root)


def frechet_numpy(a, b):
    a, b = a.numpy(), b.numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ev = np.linalg.eigvals(s1 @ s2)
    tr_root = np.sqrt(np.clip(ev.real, 0, None)).sum()
    d = a.mean(0) - b.mean(0)
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr_root)


def fid_fixture():
    g = torch.Generator().manual_seed(0)
    d = 32
    mix_a = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    mix_b = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.7 / d**0.5
    a = torch.randn(200, d, generator=g, dtype=torch.float64) @ mix_a + 0.5
    b = torch.randn(300, d, generator=g, dtype=torch.float64) @ mix_b - 0.2 * torch.arange(d)
    c = torch.randn(10, d, generator=g, dtype=torch.float64)
    dd = torch.randn(12, d, generator=g, dtype=torch.float64) * 2 + 1
    # The Rust side reads f32 features: round them first so both sides see the
    # same numbers.
    a, b, c, dd = (t.float().double() for t in (a, b, c, dd))
    out = {}
    for name, x, y in (("ab", a, b), ("aa", a, a), ("cd", c, dd)):
        ref = frechet_torch(x, y)
        check = frechet_numpy(x, y)
        print(f"fid_{name}: torch eigh {ref:.12g}, numpy eigvals(S1 S2) {check:.12g}")
        out[f"fid_{name}"] = torch.tensor([ref], dtype=torch.float64)
    out.update(a=a.float(), b=b.float(), c=c.float(), d=dd.float())
    meta = dict(META, method="torch.linalg.eigh, float64")
    save_file(out, os.path.join(OUT, "fid.safetensors"), metadata=meta)
    print("wrote", os.path.join(OUT, "fid.safetensors"))


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class MnistClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.conv3 = nn.Conv2d(16, 24, 3)
        self.norm1 = nn.BatchNorm2d(24, eps=1e-5)
        self.fc1 = nn.Linear(11616, 32)
        self.fc2 = nn.Linear(32, 10)
        self.norm2 = nn.BatchNorm1d(10, eps=1e-5)

    def features(self, x):
        # The weights were trained (PyTorch -> ONNX -> burn) on standardised
        # pixels: with pixels/255 alone the accuracy drops to 58%.
        x = (x - MNIST_MEAN) / MNIST_STD
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        x = self.norm1(x).flatten(1)
        return torch.relu(self.fc1(x))

    def forward(self, x):
        return torch.log_softmax(self.norm2(self.fc2(self.features(x))), dim=1)


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def classifier_fixture():
    weights = os.path.join(SHARED, "weights", "mnist-classifier", "mnist.safetensors")
    mnist = os.path.join(SHARED, "data", "mnist")
    if not os.path.isfile(weights):
        print(f"skipped the classifier fixture: {weights} not found (set ENSUENO_SHARED)")
        return
    model = MnistClassifier().eval()
    model.load_state_dict(load_file(weights), strict=True)
    images = read_idx(os.path.join(mnist, "t10k-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(mnist, "t10k-labels-idx1-ubyte.gz"))
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    with torch.no_grad():
        preds = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
        acc = float((preds.numpy() == labels).mean())
        print(f"torch accuracy on the {len(x)} MNIST test digits: {acc * 100:.2f}%")
        x16 = x[:16].contiguous()
        log_probs = model(x16)
        features = model.features(x16)
    meta = dict(
        META,
        images="MNIST test digits 0..16 (LeCun, Cortes, Burges), CC BY-SA 3.0",
        torch_accuracy_10k=f"{acc:.6f}",
    )
    save_file(
        {
            "images": x16,
            "labels": torch.from_numpy(labels[:16].astype(np.int64)),
            "log_probs": log_probs.contiguous(),
            "features": features.contiguous(),
        },
        os.path.join(OUT, "mnist_classifier.safetensors"),
        metadata=meta,
    )
    print("wrote", os.path.join(OUT, "mnist_classifier.safetensors"))


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    torch.set_num_threads(2)
    fid_fixture()
    classifier_fixture()
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(dict(META, fid_method="torch.linalg.eigh, float64 (scipy not installed)"), f, indent=2)
        f.write("\n")
