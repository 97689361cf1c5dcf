"""Builds torch_mps_ext: csrc/ through CMake against the installed torch."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# The build imports torch; an installed (possibly stale) copy of this package
# must not autoload into it.
os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
# ccache keys on paths relative to the checkout (its .venv included), so a
# fresh clone in another folder reuses earlier compilations.
os.environ.setdefault("CCACHE_BASEDIR", str(ROOT))


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt in build/cmake, then copies _C to
    where setuptools wants it (the source tree, or pip's temporary build
    folder). The library is built in a fixed place so that pip's changing
    folder does not re-link it: a build with nothing to do does nothing.

    CMake and Ninja write to this process's stdout. Under `pip install` pip
    keeps that to itself (shown with -v, or on failure); `make build` runs
    `setup.py build_ext --inplace` first, so the compile steps are seen."""

    def build_extension(self, ext):
        import pybind11
        import torch

        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        # TORCH_MPS_EXT_SANITIZE=1 (`make asan`): AddressSanitizer + UBSan, in
        # a folder of its own, so the normal build is left as it is.
        sanitize = os.environ.get("TORCH_MPS_EXT_SANITIZE") == "1"
        build_dir = ROOT / "build" / ("cmake-asan" if sanitize else "cmake")
        lib_dir = build_dir / "lib"
        build_dir.mkdir(parents=True, exist_ok=True)
        generator = ["-G", "Ninja"] if _has("ninja") else []
        configure = ["cmake", str(ROOT), *generator,
                     f"-DTORCH_DIR={Path(torch.__file__).parent}",
                     f"-DPYBIND11_DIR={pybind11.get_cmake_dir()}",
                     f"-DPython_EXECUTABLE={sys.executable}",
                     f"-DOUTPUT_DIR={lib_dir}",
                     f"-DTORCH_MPS_EXT_WERROR={'ON' if os.environ.get('CI') else 'OFF'}",
                     "-DCMAKE_BUILD_TYPE=Release"]
        if sanitize:
            configure.append("-DTORCH_MPS_EXT_SANITIZE=ON")
        # Configure only when the settings changed (or never ran); otherwise
        # `cmake --build` re-runs CMake by itself if CMakeLists.txt changed.
        stamp = build_dir / "setup-configure-args.txt"
        if not (build_dir / "CMakeCache.txt").exists() or not stamp.exists() \
                or stamp.read_text() != "\n".join(configure):
            stamp.unlink(missing_ok=True)
            _run(configure, build_dir)
            stamp.write_text("\n".join(configure))
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        _run(["cmake", "--build", ".", "-j", jobs], build_dir)
        # CMake names the module with the interpreter's suffix, as setuptools does.
        built = lib_dir / target.name
        if not built.exists():
            raise RuntimeError(f"CMake did not produce {built}")
        _install_file(built, target)


def _run(cmd, cwd):
    """Runs a CMake step; a failure is one line after the tool's own
    messages, not a traceback that hides them."""
    from setuptools.errors import CompileError
    if subprocess.call(cmd, cwd=cwd) != 0:
        raise CompileError(f"'{' '.join(cmd[:2])} ...' failed in {cwd}: see the messages above")


def _install_file(src, dst):
    """Copies src over dst unless dst is already that build; through a
    temporary file and a rename, so a process that has the old library
    loaded keeps a valid mapping."""
    src_stat = src.stat()
    if dst.exists():
        dst_stat = dst.stat()
        if (dst_stat.st_size, dst_stat.st_mtime_ns) == (src_stat.st_size, src_stat.st_mtime_ns):
            return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _has(tool):
    return shutil.which(tool) is not None


setup(
    name="torch_mps_ext",
    version="0.1.0",
    description="An emulated mps_ext accelerator for PyTorch (PrivateUse1).",
    packages=find_packages(include=["torch_mps_ext", "torch_mps_ext.*"]),
    py_modules=["torch_mps_ext_autoload"],
    package_data={"torch_mps_ext": ["shader/include/*", "shader/include/**/*", "fidelity/*.txt"]},
    ext_modules=[CMakeExtension("torch_mps_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch==2.13.0"],
    entry_points={"torch.backends": ["mps_ext = torch_mps_ext_autoload:load"]},
    zip_safe=False,
)
