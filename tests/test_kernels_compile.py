"""Every Triton kernel compiles ahead of time, on the CPU, for ROCm MI300 and CUDA H100.

`triton.compile` on an ASTSource builds for a GPUTarget without the GPU: gfx942 must give
amdgcn + hsaco (linked in-process by Triton's lld), sm_90 must give ptx + cubin (ptxas ships in
the triton wheel). Each kernel is built for each of its autotune configs, with every optional
input present (the widest path) and bf16 data. This is how CI proves the ROCm and CUDA claim.

The kernels must be real triton.jit functions, not the interpreter's stand-ins, so the build
runs in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it for this process).
"""

import importlib
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest

KERNELS = ("_dt_cumsum_kernel", "_states_fwd_kernel", "_output_fwd_kernel", "_dstates_bwd_kernel",
           "_chunk_bwd_dx_kernel", "_chunk_bwd_dbc_kernel", "_conv_fwd_kernel", "_conv_bwd_kernel",
           "_conv_step_kernel", "_ssd_step_kernel", "_mamba2_step_kernel", "_mla_decode_split_kernel",
           "_mla_decode_combine_kernel")
TARGETS = {("hip", "gfx942", 64): ("amdgcn", "hsaco"), ("cuda", 90, 32): ("ptx", "cubin")}

# Pointers are bf16 data unless named here; every non-pointer, non-constexpr argument is an i32
# size or stride except the fp32 scalars named here (dt clamp bounds, norm eps, MLA scale).
FP32_POINTERS = {"dt_ptr", "acs_ptr", "states_ptr", "dstates_ptr", "init_ptr", "final_ptr",
                 "dfinal_ptr", "dinit_ptr", "ddt_ptr", "dA_part_ptr", "dD_part_ptr", "A_ptr",
                 "D_ptr", "bias_ptr", "dw_part_ptr", "db_part_ptr", "part_ptr", "ml_ptr",
                 "ssm_ptr"}
INT64_POINTERS = {"start_ptr", "length_ptr"}
BOOL_POINTERS = {"real_ptr"}
FP32_SCALARS = {"dt_min", "dt_max", "qk_scale", "eps"}
# Constexprs: the widest path, Zebra shapes (SSD: p = n = 64, chunk 64, conv kernel 4; MLA
# decode: the 1B shape, H = 32, r_kv = 128, d_rope = 32, split-K partials).
CONSTEXPRS = dict(HAS_BIAS=True, SOFTPLUS=True, HAS_LIMIT=True, HAS_INIT=True, STORE_FINAL=True,
                  HAS_D=True, HAS_Z=True, HAS_DFINAL=True, SILU=True, HAS_PAD=True, CHUNK=64,
                  P=64, N=64, BLOCK_P=64, BLOCK_N=64, BLOCK_H=32, K=4, BLOCK_K=4, BLOCK_C=128,
                  SINGLE=False, BLOCK_R=128, BLOCK_DR=32, BLOCK_S=16)


def kernels():
    """(name, JITFunction, [(constexpr overrides, num_warps, num_stages)]) for every kernel."""
    import triton

    found = []
    for module in ("ssd", "ssd_bwd", "conv1d", "ssd_decode", "mamba2_step", "mla_decode"):
        for name, obj in vars(importlib.import_module(f"zebra.kernels.{module}")).items():
            if isinstance(obj, triton.runtime.Autotuner):
                found.append((name, obj.fn, [(c.kwargs, c.num_warps, c.num_stages)
                                             for c in obj.configs]))
            elif isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel"):
                found.append((name, obj, [({}, 4, 2)]))
    return found


def signature(fn, overrides):
    sig, constexprs = {}, {}
    for name, param in zip(fn.arg_names, fn.params):
        if param.is_constexpr:
            sig[name] = "constexpr"
            constexprs[name] = overrides.get(name, CONSTEXPRS.get(name))
        elif name.endswith("_ptr"):
            ssd_state = fn.__name__ == "_ssd_step_kernel" and name == "state_ptr"
            sig[name] = ("*i64" if name in INT64_POINTERS else "*i1" if name in BOOL_POINTERS else
                         "*fp32" if name in FP32_POINTERS or ssd_state else "*bf16")
        else:
            sig[name] = "fp32" if name in FP32_SCALARS else "i32"
    return sig, constexprs


def compile_one(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, config, target = job
    name, fn, configs = next(k for k in kernels() if k[0] == kernel)
    overrides, num_warps, num_stages = configs[config]
    sig, constexprs = signature(fn, overrides)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                              target=GPUTarget(*target),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    missing = [k for k in TARGETS[target] if not compiled.asm.get(k)]
    assert not missing, f"{name} {target}: no {missing}"
    return f"{name} {target[0]} warps={num_warps} stages={num_stages} {overrides}"


def compile_all():
    jobs = [(name, i, target) for name, _, configs in kernels() for i in range(len(configs))
            for target in TARGETS]
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(compile_one, jobs))


@pytest.mark.slow  # ~35 builds, about a minute on 2 cores
def test_every_kernel_compiles_for_rocm_and_cuda(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # build from scratch, not from a cache
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    built = {tuple(line.split()[:2]) for line in proc.stdout.splitlines()}
    assert built == {(k, t) for k in KERNELS for t in ("hip", "cuda")}, proc.stdout


if __name__ == "__main__":
    print("\n".join(compile_all()))
