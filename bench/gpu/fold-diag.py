"""Why did Lite0 fold no batch norm on the device's CPU? Pairs found, and the folded-vs-original difference."""
import copy, torch
from featmap.features.backbone import create_model
from featmap.features import fold
print("cpu capability", torch.backends.cpu.get_cpu_capability(), "threads", torch.get_num_threads())
for line in open("/proc/cpuinfo"):
    if line.startswith("model name"):
        print(line.strip()); break
for dev in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
    for tf32 in (True, False):
        torch.backends.cudnn.allow_tf32 = tf32
        m = create_model("tf_efficientnet_lite0").eval().to(dev, memory_format=torch.channels_last)
        probe = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(dev)
        probe = probe.contiguous(memory_format=torch.channels_last)
        pairs = fold._pairs(m, probe)
        orig = copy.deepcopy(m)
        n = fold.fold_batchnorm(m, probe, rtol=10.0)
        with torch.no_grad():
            want, got = orig(probe), m(probe)
        rel = float((want - got).abs().max() / want.abs().max())
        m2 = create_model("tf_efficientnet_lite0").eval().to(dev, memory_format=torch.channels_last)
        print(f"{dev} tf32={tf32}: pairs {len(pairs)}, folded at rtol 10: {n}, max diff / max {rel:.2e}, "
              f"folded at 1e-4: {fold.fold_batchnorm(m2, probe)}", flush=True)
