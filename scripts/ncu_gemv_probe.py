"""Three launches of each batch-1 GEMV (INT4, INT8, FP8) at one shape, for Nsight Compute (not a benchmark):

    ncu --clock-control none --launch-skip 2 --launch-count 1 -k regex:_int4_gemv \
        --section SpeedOfLight --section WarpStateStats python3 scripts/ncu_gemv_probe.py 28672x4096 int4
"""
import sys
import torch
sys.path.insert(0, "scripts")
from sweep_gemv import make_weights, runner  # noqa: E402

n, k = (int(v) for v in sys.argv[1].split("x"))
for fmt in [f for f in ("int4", "int8", "fp8") if f in sys.argv[2]]:
    (t,), _ = make_weights(fmt, n, k, 1)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    fn = runner(fmt, None)  # the kernel's default launch config
    for _ in range(3):
        fn(x, t)
    torch.cuda.synchronize()
