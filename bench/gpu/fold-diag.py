"""Why Lite0's batch norms were not folded on the H200 (the first GPU check, ce91872): on the CPU and on CUDA, with
cuDNN's TF32 on and off, the pairs found, the folded model's largest difference from the unfolded one as a share of
the largest output, and how many pairs ``fold_batchnorm`` folds at its own tolerance. Its output on the H200 is
0cc36b3-fold-diag.txt beside it.

    python bench/gpu/fold-diag.py
"""
import copy

import torch

from featmap.features import fold
from featmap.features.backbone import create_model


def lite0(device: str) -> torch.nn.Module:
    return create_model("tf_efficientnet_lite0").eval().to(device, memory_format=torch.channels_last)


def main() -> None:
    print("cpu capability", torch.backends.cpu.get_cpu_capability(), "threads", torch.get_num_threads())
    with open("/proc/cpuinfo") as f:
        print(next((line.strip() for line in f if line.startswith("model name")), "model name: unknown"))
    for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        for tf32 in (True, False):
            torch.backends.cudnn.allow_tf32 = tf32
            model = lite0(device)
            probe = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
            probe = probe.contiguous(memory_format=torch.channels_last)
            pairs = fold._pairs(model, probe)
            original = copy.deepcopy(model)
            n = fold.fold_batchnorm(model, probe, rtol=10.0)  # a tolerance nothing fails: fold every pair found
            with torch.no_grad():
                want, got = original(probe), model(probe)
            share = float((want - got).abs().max() / want.abs().max())
            print(f"{device} tf32={tf32}: pairs {len(pairs)}, folded at rtol 10: {n}, max diff / max {share:.2e}, "
                  f"folded at 1e-4: {fold.fold_batchnorm(lite0(device), probe)}", flush=True)


if __name__ == "__main__":
    main()
