"""Train a 1-bit cResNet-20 with OvSW on scikit-learn's digits, on the CPU.

    python examples/quickstart.py [--epochs 15]

Prints top-1 on the held-out digits and the mean fraction of silent weights (weights
whose sign has not moved lately) that Silence Awareness Decaying tracked.
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import ovsw
from ovsw.train.data import digits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    train = DataLoader(digits(train=True), batch_size=args.batch_size, shuffle=True)
    val = DataLoader(digits(train=False), batch_size=256)

    model = ovsw.models.create("cResNet20_1w1a", num_classes=10)
    sgd = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    # CIFAR-10 ResNet-20 settings of the paper's scripts: delta 0.04, lambda 9e-4.
    opt = ovsw.OvSW(sgd, model, enable_ags=True, delta=0.04, enable_dampen=True, dampen_weight=9e-4)

    start = time.time()
    for epoch in range(args.epochs):
        lr = 0.5 * (1 + math.cos(math.pi * epoch / args.epochs)) * args.lr + 1e-5
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        top1 = evaluate(model, val)
        print(
            f"epoch {epoch + 1:2d}/{args.epochs}  loss {loss.item():.3f}  "
            f"val top-1 {top1:5.1f}%  silent {opt.mean_silent_ratio():.3f}  "
            f"({time.time() - start:.0f}s)",
            flush=True,
        )
    print(f"top-1 {top1:.2f}%  mean silent fraction {opt.mean_silent_ratio():.4f}")


@torch.no_grad()
def evaluate(model, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * correct / total


if __name__ == "__main__":
    main()
