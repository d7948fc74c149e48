"""The verification workload: a chain of seeded fp16 matrix products per GPU.

Both sides import this module: the node runs the chain, the portal checks a few
rows of it. Nothing the node says about its device or its timing is used; the
portal times the challenge itself, from issuing it to receiving the answer, and
the deadline is what the *claimed* GPUs need, far less than a CPU needs.

The chain, for each GPU (``n`` = size, ``R`` = steps):

- ``B`` (n x n, entries -1, 0, 1) comes from the challenge seed; ``X₀`` (n x n,
  same entries) from a seed that mixes the challenge seed with the GPU's NVML
  UUID, so every GPU gets its own work and the answer is bound to the UUID the
  node registered. ``X₀`` is drawn in blocks of :data:`ROW_BLOCK` rows, so any
  row can be drawn on its own;
- ``X_{k+1} = ((X_k · B) mod 3) - 1``, ``R`` times. The sums are integers below
  2¹¹ in practice (sigma ~ 60 for n = 8192), so an fp16 product with fp32
  accumulation is exact, on any GPU and in any order, and so is numpy's fp32
  product on the portal. The ``mod`` makes the chain non-linear: no shortcut
  through ``B^R``;
- the answer is, per GPU UUID, the first 4 bytes of the SHA-256 of every row of
  ``X_R`` (``4 n`` bytes, base64).

Row ``i`` of ``X_R`` depends only on row ``i`` of ``X₀`` and on ``B``, so the
portal checks :data:`SAMPLED_ROWS` secret rows per GPU at ``R n²`` work each;
the node, not knowing which, must compute all ``R · 2 n³``. A node that skips a
share ``1 - f`` of the rows passes with probability ``f^3`` per GPU.

The GPU path needs PyTorch (``pip install 'gpuportal[provider-gpu]'``). Demo
nodes run a small chain on the CPU.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Peak dense FP16 tensor throughput (TFLOP/s, fp32 accumulation, no sparsity).
PEAK_FP16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "RTX-4090": 165.0,
    "RTX-3090": 71.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "V100": 125.0,
    "T4": 65.0,
}
#: An unknown model is timed as the slowest one we know, so a CPU still fails.
DEFAULT_PEAK_TFLOPS = min(PEAK_FP16_TFLOPS.values())
#: The share of peak an honest GPU is given: cuBLAS reaches 60-80 % on these sizes.
MIN_SHARE = 0.25
#: Seconds every challenge gets for network and JSON, and each GPU for drawing its
#: matrices, copying them, and hashing the rows (on the node's CPU).
BASE_SECONDS = 3.0
PER_GPU_SECONDS = 1.5
#: The "realistic CPU" a fake GPU node might compute on: a two-socket server doing
#: fp32 products at 4 TFLOP/s (numpy/OpenBLAS on AVX-512 reaches 1-3). The test
#: suite proves every model's deadline is shorter than this CPU's time.
CPU_REFERENCE_TFLOPS = 4.0

GPU_SIZE = 8192
GPU_STEPS = 64
DEMO_SIZE = 128
DEMO_STEPS = 4
ROW_BLOCK = 256
SAMPLED_ROWS = 3
FINGERPRINT_BYTES = 4


class WorkloadUnavailable(RuntimeError):
    """The GPU workload cannot run here (no PyTorch with CUDA)."""


@dataclass(frozen=True)
class Spec:
    """What one challenge asks for: matrix size, chain length, and for whom."""

    size: int
    steps: int
    demo: bool

    @property
    def work_per_gpu(self) -> float:
        """Floating-point operations of one GPU's chain."""
        return 2.0 * self.steps * float(self.size) ** 3


def spec_for(demo: bool) -> Spec:
    return Spec(DEMO_SIZE, DEMO_STEPS, True) if demo else Spec(GPU_SIZE, GPU_STEPS, False)


def peak_tflops(model: str) -> float:
    """The table entry whose name appears in ``model`` (longest match), else the default."""
    upper = model.upper().replace(" ", "-")
    hits = [(len(k), v) for k, v in PEAK_FP16_TFLOPS.items() if k in upper]
    return max(hits)[1] if hits else DEFAULT_PEAK_TFLOPS


def gpu_seconds(model: str, spec: Spec) -> float:
    """What one claimed GPU is given: its overhead plus the chain at MIN_SHARE of peak."""
    return PER_GPU_SECONDS + spec.work_per_gpu / (peak_tflops(model) * 1e12 * MIN_SHARE)


def deadline_seconds(models: Sequence[str], spec: Spec) -> float:
    """How long after issuing the challenge the answer for these GPUs may arrive."""
    return BASE_SECONDS + sum(gpu_seconds(m, spec) for m in models)


def cpu_seconds(gpus: int, spec: Spec, tflops: float = CPU_REFERENCE_TFLOPS) -> float:
    """How long a CPU at ``tflops`` needs for the chains of ``gpus`` GPUs (compute only)."""
    return gpus * spec.work_per_gpu / (tflops * 1e12)


# --- the chain --------------------------------------------------------------------------


def gpu_seed(seed: int, uuid: str) -> int:
    """The seed of one GPU's ``X₀``: the challenge seed mixed with the GPU's UUID."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{uuid}".encode()).digest()[:8], "big")


def matrix_b(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, 0xB]).integers(-1, 2, size=(size, size), dtype=np.int8)


def start_rows(seed: int, uuid: str, size: int, rows: Iterable[int] | None = None) -> np.ndarray:
    """Rows of one GPU's ``X₀`` (all of them when ``rows`` is None), as int8."""
    mixed = gpu_seed(seed, uuid)
    blocks: dict[int, np.ndarray] = {}

    def block(b: int) -> np.ndarray:
        if b not in blocks:
            height = min(ROW_BLOCK, size - b * ROW_BLOCK)
            rng = np.random.default_rng([mixed, b])
            blocks[b] = rng.integers(-1, 2, size=(height, size), dtype=np.int8)
        return blocks[b]

    if rows is None:
        return np.concatenate([block(b) for b in range(-(-size // ROW_BLOCK))])
    return np.stack([block(r // ROW_BLOCK)[r % ROW_BLOCK] for r in rows])


def step_cpu(x: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One link of the chain in float32 (exact: every sum is a small integer)."""
    return np.mod(x @ b, 3) - 1


def fingerprints(rows: np.ndarray) -> bytes:
    """The first bytes of the SHA-256 of each row of small integers."""
    data = np.ascontiguousarray(rows.astype(np.int8))
    return b"".join(hashlib.sha256(r.tobytes()).digest()[:FINGERPRINT_BYTES] for r in data)


def expected_rows(
    seed: int, spec: Spec, sample: dict[str, list[int]]
) -> dict[str, dict[int, bytes]]:
    """The portal's reference: the fingerprint of each sampled row, per GPU UUID.

    All GPUs' sampled rows go through the chain together, one product per step.
    """
    wanted = [(uuid, r) for uuid, rows in sorted(sample.items()) for r in rows]
    if not wanted:
        return {}
    b = matrix_b(seed, spec.size).astype(np.float32)
    x = np.concatenate(
        [start_rows(seed, uuid, spec.size, rows) for uuid, rows in sorted(sample.items())]
    ).astype(np.float32)
    for _ in range(spec.steps):
        x = step_cpu(x, b)
    out: dict[str, dict[int, bytes]] = {}
    for (uuid, r), row in zip(wanted, x, strict=True):
        out.setdefault(uuid, {})[r] = fingerprints(row[None, :])
    return out


def encode(prints: bytes) -> str:
    return base64.b64encode(prints).decode()


def decode(text: str, size: int) -> bytes | None:
    """The node's fingerprints, or None when they are not ``size`` of them in base64."""
    try:
        raw = base64.b64decode(text.encode(), validate=True)
    except (ValueError, UnicodeError):
        return None
    return raw if len(raw) == size * FINGERPRINT_BYTES else None


# --- running it on the node -------------------------------------------------------------


def run_cpu(seed: int, spec: Spec, uuid: str) -> bytes:
    """The whole chain for one GPU on the CPU (what demo nodes do)."""
    b = matrix_b(seed, spec.size).astype(np.float32)
    x = start_rows(seed, uuid, spec.size).astype(np.float32)
    for _ in range(spec.steps):
        x = step_cpu(x, b)
    return fingerprints(x)


def run_gpu(seed: int, spec: Spec, uuid: str, index: int) -> bytes:
    """The chain on GPU ``index`` through PyTorch, in fp16 with fp32 accumulation."""
    try:
        import torch
    except ImportError:
        raise WorkloadUnavailable(
            "PyTorch is not installed: pip install 'gpuportal[provider-gpu]' to verify real GPUs"
        ) from None
    if not torch.cuda.is_available():
        raise WorkloadUnavailable("PyTorch sees no CUDA device")
    # fp32 accumulation keeps every sum exact; fp16 partial sums might not be.
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    device = torch.device(f"cuda:{index}")
    b = torch.from_numpy(matrix_b(seed, spec.size)).to(device).half()
    x = torch.from_numpy(start_rows(seed, uuid, spec.size)).to(device).half()
    for _ in range(spec.steps):
        x = torch.remainder(x @ b, 3) - 1
    return fingerprints(x.to(torch.int8).cpu().numpy())


def run_challenge(challenge: dict[str, Any], gpus: Sequence[tuple[int, str]]) -> list[dict]:
    """Answer a challenge for ``gpus`` (index, NVML UUID): on the CPU for demo
    challenges, else through CUDA. One result per GPU, keyed by its UUID."""
    spec = Spec(int(challenge["size"]), int(challenge["steps"]), bool(challenge["demo"]))
    seed = int(challenge["seed"])
    out = []
    for index, uuid in gpus:
        prints = run_cpu(seed, spec, uuid) if spec.demo else run_gpu(seed, spec, uuid, index)
        out.append({"index": index, "uuid": uuid, "rows": encode(prints)})
    return out
