#!/usr/bin/env bash
# Builds ensueno with `--features cuda` on a machine without a CUDA toolkit or
# GPU (the binary is then carried to a GPU machine): fetches nvcc, the CUDA
# headers and the runtime libraries as NVIDIA's PyPI wheels, makes a link-time
# stub of the driver library (libcuda.so.1 comes from the GPU machine's driver
# at run time) and prints the environment for cargo.
#   usage: eval "$(scripts/cuda_build_env.sh [DIR])"   (default DIR: ~/.cache/ensueno/cuda13)
#          cargo build --release --features cuda -p ensueno-cli
# CUDA 13.0 because candle's kernels are compiled to PTX at build time, and a
# driver only loads PTX of its own CUDA version or older (the H100 machines
# here run driver 580, CUDA 13.0). At run time the binary needs libcublas,
# libcublasLt, libcurand, libnvrtc and libcudart of CUDA 13 on
# LD_LIBRARY_PATH (PyTorch's cu13 wheels carry them).
#   CUDA_LIBS: a folder that already holds those CUDA 13 libraries (e.g. a
#   torch venv's site-packages/nvidia/cu13/lib) for cuBLAS and NVRTC;
#   without it their wheels (cuBLAS: several hundred MB) are downloaded too.
set -euo pipefail
DIR="${1:-$HOME/.cache/ensueno/cuda13}"
ROOT="$DIR/nvidia/cu13"
PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/bin/nvcc" ] || [ ! -e "$ROOT/lib64/libcuda.so" ]; then
    mkdir -p "$DIR/wheels"
    pkgs=("nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*"
        "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*")
    pkgs+=("nvidia-curand>=10.4,<10.5")
    [ -n "${CUDA_LIBS:-}" ] || pkgs+=("nvidia-cuda-nvrtc==13.0.*" "nvidia-cublas==13.0.*")
    for pkg in "${pkgs[@]}"; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$DIR/wheels" "$pkg" >&2
    done
    for w in "$DIR"/wheels/*.whl; do "$PY" -m zipfile -e "$w" "$DIR" >&2; done
    chmod +x "$ROOT"/bin/* "$ROOT"/nvvm/bin/* 2>/dev/null || true
    mkdir -p "$ROOT/lib64"
    # The driver API stub: every cu* entry point cudarc declares, as empty
    # functions in a library named like the driver's.
    CUDARC="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | tail -1)"
    grep -oE "pub (unsafe )?fn cu[A-Za-z0-9_]+" "$CUDARC/src/driver/sys/mod.rs" | sed -E 's/.*fn //' |
        sort -u | awk '{print "void " $1 "(void){}"}' > "$DIR/cuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 "$DIR/cuda_stub.c" -o "$ROOT/lib64/libcuda.so"
    libs=("$ROOT"/lib/lib*.so.*)
    [ -z "${CUDA_LIBS:-}" ] || libs+=("$CUDA_LIBS"/libcublas.so.* "$CUDA_LIBS"/libcublasLt.so.* "$CUDA_LIBS"/libnvrtc.so.*)
    for lib in "${libs[@]}"; do
        [ -e "$lib" ] || continue
        base="$(basename "$lib")"
        ln -sf "$(cd "$(dirname "$lib")" && pwd)/$base" "$ROOT/lib64/${base%%.so.*}.so"
    done
fi
echo "export CUDA_ROOT='$ROOT' CUDA_PATH='$ROOT' CUDARC_CUDA_VERSION=13000 CUDA_COMPUTE_CAP=90"
echo "export PATH='$ROOT/bin':\"\$PATH\" LIBRARY_PATH='$ROOT/lib64:$ROOT/lib'"
