"""The verification workload: a seeded matrix product per GPU, checked by the portal.

The portal sends a seed and a size. The node multiplies two seeded integer
matrices (entries -8..8, held as float32, so every sum is exact on any device
and in any order) ``repeats`` times on each GPU, and reports the SHA-256 of the
product and how long the products took. The portal recomputes the product
itself and checks the time against the range the claimed model can do: a much
slower GPU (or a CPU pretending) and a physically impossible speed both fail.

The GPU path needs PyTorch (``pip install 'gpuportal[provider-gpu]'``). Demo
nodes run the same product on the CPU and their results say so.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: Peak dense FP32 throughput (TFLOP/s, no tensor cores) of the models we can time.
PEAK_FP32_TFLOPS = {
    "H100": 67.0,
    "H200": 67.0,
    "A100": 19.5,
    "RTX-4090": 82.6,
    "RTX-3090": 35.6,
    "L4": 30.3,
    "L40S": 91.6,
    "L40": 90.5,
    "A10G": 31.2,
    "A10": 31.2,
    "T4": 8.1,
    "V100": 15.7,
}
#: A result faster than this share of peak is impossible; slower than the low share is
#: not the claimed GPU (or it is badly throttled).
FASTEST_SHARE = 1.3
SLOWEST_SHARE = 0.03
GPU_SIZE = 2048
GPU_REPEATS = 20
DEMO_SIZE = 256
DEMO_REPEATS = 1


class WorkloadUnavailable(RuntimeError):
    """The GPU workload cannot run here (no PyTorch with CUDA)."""


@dataclass(frozen=True)
class WorkloadResult:
    index: int
    digest: str
    seconds: float
    device: str  # "cuda:<i>" or "cpu (demo)"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def matrices(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(-8, 9, size=(size, size)).astype(np.float32)
    b = rng.integers(-8, 9, size=(size, size)).astype(np.float32)
    return a, b


def digest(product: np.ndarray) -> str:
    return hashlib.sha256(np.rint(product).astype(np.int64).tobytes()).hexdigest()


def expected_digest(seed: int, size: int) -> str:
    """What an honest node reports: computed exactly (float64) on the portal's CPU."""
    a, b = matrices(seed, size)
    return digest(a.astype(np.float64) @ b.astype(np.float64))


def flops(size: int, repeats: int) -> float:
    return 2.0 * size**3 * repeats


def peak_tflops(model: str) -> float | None:
    """The table entry whose name appears in ``model`` (longest match), if any."""
    upper = model.upper().replace(" ", "-")
    hits = [(len(k), v) for k, v in PEAK_FP32_TFLOPS.items() if k in upper]
    return max(hits)[1] if hits else None


def timing_range(model: str, size: int, repeats: int) -> tuple[float, float] | None:
    """(fastest, slowest) plausible seconds for the claimed model, or None if unknown."""
    peak = peak_tflops(model)
    if peak is None:
        return None
    work = flops(size, repeats)
    return work / (peak * 1e12 * FASTEST_SHARE), work / (peak * 1e12 * SLOWEST_SHARE)


def run_cpu(seed: int, size: int, index: int, repeats: int = DEMO_REPEATS) -> WorkloadResult:
    a, b = matrices(seed, size)
    start = time.perf_counter()
    product = a @ b
    for _ in range(repeats - 1):
        product = a @ b
    seconds = time.perf_counter() - start
    return WorkloadResult(index, digest(product), seconds, "cpu (demo)")


def run_gpu(seed: int, size: int, index: int, repeats: int = GPU_REPEATS) -> WorkloadResult:
    """The product on GPU ``index`` through PyTorch, timed with CUDA synchronisation."""
    try:
        import torch
    except ImportError:
        raise WorkloadUnavailable(
            "PyTorch is not installed: pip install 'gpuportal[provider-gpu]' to verify real GPUs"
        ) from None
    if not torch.cuda.is_available():
        raise WorkloadUnavailable("PyTorch sees no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False  # exact float32 products
    a, b = matrices(seed, size)
    device = torch.device(f"cuda:{index}")
    ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
    (ta @ tb).sum().item()  # warm up kernels outside the timing
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        product = ta @ tb
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return WorkloadResult(index, digest(product.cpu().numpy()), seconds, f"cuda:{index}")


def run_challenge(
    seed: int, size: int, repeats: int, gpu_indices: list[int], demo: bool
) -> list[WorkloadResult]:
    """Run the challenge on every GPU: on the CPU for demo nodes, else through CUDA."""
    if demo:
        return [run_cpu(seed, size, i, repeats) for i in gpu_indices]
    return [run_gpu(seed, size, i, repeats) for i in gpu_indices]
