"""The verification workload: a chain of seeded fp16 matrix products per GPU.

Both sides import this module: the node runs the chain, the portal checks a few
rows of it. Nothing the node says about its device or its timing is used; the
portal times the challenge itself, from issuing it to receiving the answer, and
the deadline is what the *claimed* GPUs need, far less than a CPU needs.

The chain, for each GPU (``m`` rows, width ``n``, ``R`` steps):

- ``B`` (n x n) and ``B0`` (64 x n) come from the challenge seed, ``S``
  (m x 64) from a seed that mixes the challenge seed with the GPU's NVML UUID,
  so every GPU gets its own work and the answer is bound to the UUID the node
  registered. All entries are -1, 0 or 1; ``S`` is drawn in blocks of
  :data:`ROW_BLOCK` rows, so any row can be drawn on its own;
- ``X0 = g(S B0)`` and ``X_{k+1} = g(X_k B)``, ``R`` times, where
  ``g(y) = (y mod 3) - 1``. Every sum is an integer far below 2^11 (sigma ~ 30
  for n = 2048), so an fp16 product with fp32 accumulation is exact on any GPU
  and in any order, and so is numpy's fp32 product on the portal. ``g`` makes
  the chain non-linear: there is no shortcut through powers of ``B``;
- the answer is, per GPU UUID, the first 4 bytes of the SHA-256 of each group
  of :data:`GROUP` consecutive rows of ``X_R`` (int8), in base64.

Row ``i`` of ``X_R`` depends only on row ``i`` of ``S`` and on ``B0``, ``B``,
so the portal checks :data:`SAMPLED_GROUPS` secret groups per GPU at
``GROUP R n^2`` multiply-adds each (0.1-1 s of CPU per GPU); the node, not knowing which,
must compute all ``2 R m n^2`` (35 TFLOP per GPU). A node that skips a share
``1 - f`` of the groups passes with probability ``f^3`` per GPU.

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
#: The share of peak an honest GPU is given: cuBLAS reaches 60-80 % on these shapes.
MIN_SHARE = 0.25
#: Seconds every challenge gets for the network and JSON, and each GPU for drawing
#: its matrices, copying them, and hashing the rows (on the node's CPU).
BASE_SECONDS = 2.0
PER_GPU_SECONDS = 1.5
#: The "realistic CPU" a fake GPU node might compute on: a two-socket server doing
#: fp32 products at 4 TFLOP/s (numpy/OpenBLAS on AVX-512 reaches 1-3). The test
#: suite proves every model's deadline is shorter than this CPU's time.
CPU_REFERENCE_TFLOPS = 4.0

GPU_ROWS, GPU_SIZE, GPU_STEPS = 131072, 2048, 32
DEMO_ROWS, DEMO_SIZE, DEMO_STEPS = 256, 64, 2
SEED_WIDTH = 64
ROW_BLOCK = 4096
GROUP = 8
SAMPLED_GROUPS = 3
FINGERPRINT_BYTES = 4


class WorkloadUnavailable(RuntimeError):
    """The GPU workload cannot run here (no PyTorch with CUDA)."""


@dataclass(frozen=True)
class Spec:
    """What one challenge asks for: rows, width, chain length, and for whom."""

    rows: int
    size: int
    steps: int
    demo: bool

    @property
    def groups(self) -> int:
        return self.rows // GROUP

    @property
    def work_per_gpu(self) -> float:
        """Floating-point operations of one GPU's chain."""
        return 2.0 * self.steps * self.rows * float(self.size) ** 2


def spec_for(demo: bool) -> Spec:
    if demo:
        return Spec(DEMO_ROWS, DEMO_SIZE, DEMO_STEPS, True)
    return Spec(GPU_ROWS, GPU_SIZE, GPU_STEPS, False)


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
    """The seed of one GPU's ``S``: the challenge seed mixed with the GPU's UUID."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{uuid}".encode()).digest()[:8], "big")


def shared(seed: int, spec: Spec) -> tuple[np.ndarray, np.ndarray]:
    """``B0`` and ``B``, the same for every GPU of the challenge (int8)."""
    rng = np.random.default_rng([seed, 0xB])
    b0 = rng.integers(-1, 2, size=(SEED_WIDTH, spec.size), dtype=np.int8)
    b = rng.integers(-1, 2, size=(spec.size, spec.size), dtype=np.int8)
    return b0, b


def seed_rows(seed: int, uuid: str, spec: Spec, rows: Iterable[int] | None = None) -> np.ndarray:
    """Rows of one GPU's ``S`` (all of them when ``rows`` is None), as int8."""
    mixed = gpu_seed(seed, uuid)
    blocks: dict[int, np.ndarray] = {}

    def block(b: int) -> np.ndarray:
        if b not in blocks:
            height = min(ROW_BLOCK, spec.rows - b * ROW_BLOCK)
            rng = np.random.default_rng([mixed, b])
            blocks[b] = rng.integers(-1, 2, size=(height, SEED_WIDTH), dtype=np.int8)
        return blocks[b]

    if rows is None:
        return np.concatenate([block(b) for b in range(-(-spec.rows // ROW_BLOCK))])
    return np.stack([block(r // ROW_BLOCK)[r % ROW_BLOCK] for r in rows])


def link(x: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One link of the chain in float32 (exact: every sum is a small integer)."""
    return np.mod(x @ b, 3) - 1


def chain_cpu(s: np.ndarray, b0: np.ndarray, b: np.ndarray, steps: int) -> np.ndarray:
    """``X_R`` for the rows of ``S`` given, on the CPU, as int8."""
    bf = b.astype(np.float32)
    x = link(s.astype(np.float32), b0.astype(np.float32))
    for _ in range(steps):
        x = link(x, bf)
    return x.astype(np.int8)


def fingerprints(x: np.ndarray) -> bytes:
    """The first bytes of the SHA-256 of each group of GROUP rows of ``X_R``."""
    data = np.ascontiguousarray(x.astype(np.int8)).reshape(-1, GROUP * x.shape[1])
    return b"".join(hashlib.sha256(g.tobytes()).digest()[:FINGERPRINT_BYTES] for g in data)


def expected_groups(
    seed: int, spec: Spec, sample: dict[str, list[int]]
) -> dict[str, dict[int, bytes]]:
    """The portal's reference: the fingerprint of each sampled group, per GPU UUID.

    All GPUs' sampled rows go through the chain together, one product per step.
    """
    wanted = [(uuid, g) for uuid, groups in sorted(sample.items()) for g in groups]
    if not wanted:
        return {}
    b0, b = shared(seed, spec)
    s = np.concatenate(
        [
            seed_rows(seed, uuid, spec, range(g * GROUP, (g + 1) * GROUP))
            for uuid, groups in sorted(sample.items())
            for g in groups
        ]
    )
    x = chain_cpu(s, b0, b, spec.steps)
    out: dict[str, dict[int, bytes]] = {}
    for k, (uuid, g) in enumerate(wanted):
        out.setdefault(uuid, {})[g] = fingerprints(x[k * GROUP : (k + 1) * GROUP])
    return out


def encode(prints: bytes) -> str:
    return base64.b64encode(prints).decode()


def decode(text: str, spec: Spec) -> bytes | None:
    """The node's fingerprints, or None when they are not one per group in base64."""
    try:
        raw = base64.b64decode(text.encode(), validate=True)
    except (ValueError, UnicodeError):
        return None
    return raw if len(raw) == spec.groups * FINGERPRINT_BYTES else None


# --- running it on the node -------------------------------------------------------------


def run_cpu(seed: int, spec: Spec, uuid: str) -> bytes:
    """The whole chain for one GPU on the CPU (what demo nodes do)."""
    b0, b = shared(seed, spec)
    return fingerprints(chain_cpu(seed_rows(seed, uuid, spec), b0, b, spec.steps))


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
    b0_np, b_np = shared(seed, spec)
    b0 = torch.from_numpy(b0_np).to(device).half()
    b = torch.from_numpy(b_np).to(device).half()
    x = torch.remainder(torch.from_numpy(seed_rows(seed, uuid, spec)).to(device).half() @ b0, 3)
    x = x - 1
    for _ in range(spec.steps):
        x = torch.remainder(x @ b, 3) - 1
    return fingerprints(x.to(torch.int8).cpu().numpy())


def warm_up(indices: Sequence[int], demo: bool) -> None:
    """Load PyTorch and open a CUDA context on each GPU before asking for a challenge:
    the portal's clock runs from the moment it issues one, and a first CUDA start
    can take seconds. Does nothing on demo nodes or where CUDA is missing (the
    answer then says why)."""
    if demo:
        return
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        return
    for index in indices:
        device = torch.device(f"cuda:{index}")
        x = torch.ones((256, 256), device=device, dtype=torch.float16)
        (x @ x).sum().item()


def challenge_spec(challenge: dict[str, Any]) -> Spec:
    """The spec a challenge (as the portal sends it) asks for."""
    return Spec(
        int(challenge["rows"]),
        int(challenge["size"]),
        int(challenge["steps"]),
        bool(challenge["demo"]),
    )


def run_challenge(challenge: dict[str, Any], gpus: Sequence[tuple[int, str]]) -> list[dict]:
    """Answer a challenge for ``gpus`` (index, NVML UUID): on the CPU for demo
    challenges, else through CUDA. One result per GPU, keyed by its UUID."""
    spec = challenge_spec(challenge)
    seed = int(challenge["seed"])
    out = []
    for index, uuid in gpus:
        prints = run_cpu(seed, spec, uuid) if spec.demo else run_gpu(seed, spec, uuid, index)
        out.append({"index": index, "uuid": uuid, "rows": encode(prints)})
    return out
