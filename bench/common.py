"""What every perf bench prints first: the hardware, the versions and the two measured ceilings.

Ceilings are measured in the same run as the numbers they divide (METHOD.md: datasheet rates
are leads): HBM bandwidth from a large device-to-device copy (bytes read + bytes written), bf16
matrix rate from an 8192^3 product on random data. The issue's reference values for the H100
used here are about 3.0 TB/s and 800 TFLOP/s (datasheet 3.35 TB/s, 989 TFLOP/s).
"""

import platform

import torch
import triton
from triton.testing import do_bench

DATASHEET = {"H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12)}  # HBM bytes/s, dense bf16 FLOP/s


def hardware() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    gpu = torch.version.hip and f"HIP {torch.version.hip}" or f"CUDA {torch.version.cuda}"
    return f"{name}, torch {torch.__version__}, triton {triton.__version__}, {gpu}"


def datasheet() -> tuple[float, float]:
    name = torch.cuda.get_device_name()
    return next((v for k, v in DATASHEET.items() if k in name), (float("nan"), float("nan")))


def copy_bandwidth(n_bytes: int = 2**30) -> float:
    """Bytes/s of a device-to-device copy, counting the bytes read and the bytes written."""
    src = torch.randint(0, 255, (n_bytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * n_bytes / (ms * 1e-3)


def matmul_flops(n: int = 8192) -> float:
    """FLOP/s of an n^3 bf16 matrix product on random data."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * n**3 / (ms * 1e-3)


def print_header(title: str, command: str):
    print(f"# {title}\n{hardware()}\ncommand: {command}")


def _fmt(v) -> str:
    if not isinstance(v, float):
        return str(v)
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"


def table_header(columns: list[str]) -> str:
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def table_row(row: dict, columns: list[str]) -> str:
    """One markdown row (printed as soon as it is measured, so a cut-off run keeps what it has)."""
    return "| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |"


def table(rows: list[dict], columns: list[str]) -> str:
    return "\n".join([table_header(columns)] + [table_row(r, columns) for r in rows])
