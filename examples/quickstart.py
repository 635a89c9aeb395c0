"""A one-minute tour of fastkd on CPU: every loss on a student/teacher pair, with gradients.

    python examples/quickstart.py
"""

import time

import torch

import fastkd


def main() -> None:
    torch.manual_seed(0)
    batch, classes, height, width = 2, 19, 64, 128
    m = height * width
    # Backbone features (post-ReLU, different widths) and segmentation logits of a student and a teacher.
    s_feat = torch.relu(torch.randn(batch, 128, height, width)).requires_grad_()
    t_feat = torch.relu(torch.randn(batch, 512, height, width))
    s_logits = torch.randn(batch, classes, height, width, requires_grad=True)
    t_logits = torch.randn(batch, classes, height, width)
    print(f"fastkd {fastkd.__version__}, extension: {fastkd.build_info()}")
    print(f"maps {height}x{width}: m = {m} positions; one float32 m x m affinity matrix would take "
          f"{m * m * 4 / 2**30:.1f} GiB per image, fastkd never builds it\n")

    losses = {
        "pair-wise affinity, full graph": lambda: fastkd.PairwiseAffinityLoss()(s_feat, t_feat),
        "pair-wise affinity, 2x2 patches, window 3": lambda: fastkd.PairwiseAffinityLoss(patch=2, window=3)(s_feat, t_feat),
        "affinity distillation (He et al.)": lambda: fastkd.AffinityDistillationLoss()(s_feat, t_feat),
        "8-neighbour consistency": lambda: fastkd.ConsistencyLoss()(s_logits, t_logits),
        "probability": lambda: fastkd.ProbabilityLoss()(s_logits, t_logits),
        "pixel-wise KD, T=2": lambda: fastkd.PixelwiseKDLoss(temperature=2.0)(s_logits, t_logits),
    }
    for name, compute in losses.items():
        start = time.perf_counter()
        loss = compute()
        loss.backward()
        print(f"{name:45s} loss {loss.item():.6e}   forward+backward {time.perf_counter() - start:6.3f} s")

    labels = fastkd.pseudo_labels(t_logits, threshold=0.2)
    print(f"\npseudo-labels: {(labels != 255).float().mean().item():.1%} of pixels confident enough to label")
    print(f"student feature gradient norm: {s_feat.grad.norm().item():.3e}")


if __name__ == "__main__":
    main()
