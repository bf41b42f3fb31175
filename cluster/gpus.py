"""Peak dense bf16 FLOP/s of the GPUs we train on: the denominator of model FLOP utilisation (MFU).

From NVIDIA's datasheets (A100 Tensor Core GPU; H100 Tensor Core GPU; H200 Tensor Core GPU), which
give bf16 Tensor Core throughput with 2:4 structured sparsity: a dense matrix product gets half of
it. Training runs dense.
"""

from __future__ import annotations

# First match wins, so each board's variant comes before the name it shares: torch.cuda.get_device_name()
# says e.g. "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H200".
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("A100", 312e12),  # SXM and PCIe alike
    ("H100 PCIe", 756e12),  # 1,513 TFLOP/s sparse
    ("H100 NVL", 835e12),  # 1,671 sparse
    ("H100", 989.5e12),  # SXM: 1,979 sparse
    ("H200 NVL", 835e12),  # 1,671 sparse
    ("H200", 989.5e12),  # SXM: 1,979 sparse, the H100 SXM's chip with more memory
)


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 FLOP/s of one GPU named ``device_name`` (torch.cuda.get_device_name()); None for a
    device not in the table (a CPU among them): no MFU rather than one against a guessed peak."""
    for name, flops in PEAK_BF16_FLOPS:
        if name in device_name:
            return flops
    return None
