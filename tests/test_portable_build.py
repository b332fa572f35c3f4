"""The torch-free kernel harness (csrc/cpu/harness/kernel_check.cpp), built and run natively:
every kernel set this CPU runs against the portable kernels, and every build of the per-token
math against the portable one. The AArch64 half (cross-compiled, run under qemu) is
scripts/check_portable.sh, which CI runs."""
import json
import platform
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "csrc" / "cpu"
ARCH_FILES = json.loads((SRC / "arch_sources.json").read_text()).get(platform.machine(), [])


def build_and_run(tmp_path, scalar_kernels: Path = SRC / "kernels_scalar.cpp"):
    files = [SRC / f for f in ("harness/kernel_check.cpp", "kernel_table.cpp", "transform.cpp", *ARCH_FILES)]
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler is needed (the extension itself is built with one)"
    exe = tmp_path / "kernel_check"
    subprocess.run([cxx, "-O3", "-std=c++17", "-ffp-contract=off", f"-I{SRC}", *map(str, files), str(scalar_kernels),
                    "-o", str(exe)], check=True, capture_output=True, timeout=600)
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)


def test_every_kernel_set_agrees_with_the_portable_kernels(tmp_path):
    run = build_and_run(tmp_path)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "all kernel sets agree with the portable kernels" in run.stdout
    from pyquant.ops import _C

    header = run.stdout.splitlines()[0]  # "kernel sets in this build: ..."
    for isa in _C.supported_isas():  # the harness sees the table the extension was built with
        assert f" {isa}" in header, (isa, header)


def test_the_harness_catches_a_wrong_kernel(tmp_path):
    # the portable int kernel with one product off by one: the other sets must disagree with it
    # (on an architecture with only the portable set, its naive-loop check must)
    source = (SRC / "kernels_scalar.cpp").read_text()
    bad = source.replace("hi += z * ah[i * 64 + p];", "hi += z * ah[i * 64 + p] + (p == 5 && i == 2);")
    assert bad != source
    (tmp_path / "kernels_scalar.cpp").write_text(bad)
    run = build_and_run(tmp_path, tmp_path / "kernels_scalar.cpp")
    assert run.returncode == 1
    assert "outputs differ" in run.stdout or "portable int kernel vs naive sum" in run.stdout
