"""Builds torch_mps_ext: csrc/ through CMake against the installed torch."""

import os
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
    """Configures and builds CMakeLists.txt; the outputs land next to _C."""

    def build_extension(self, ext):
        import pybind11
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = ROOT / "build" / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        generator = ["-G", "Ninja"] if _has("ninja") else []
        subprocess.check_call(
            ["cmake", str(ROOT), *generator,
             f"-DTORCH_DIR={Path(torch.__file__).parent}",
             f"-DPYBIND11_DIR={pybind11.get_cmake_dir()}",
             f"-DPython_EXECUTABLE={sys.executable}",
             f"-DOUTPUT_DIR={out_dir}",
             f"-DTORCH_MPS_EXT_WERROR={'ON' if os.environ.get('CI') else 'OFF'}",
             "-DCMAKE_BUILD_TYPE=Release"],
            cwd=build_dir)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call(["cmake", "--build", ".", "-j", jobs], cwd=build_dir)
        # The ext's own file name is what setuptools expects; CMake names it
        # with the interpreter's suffix, which is the same.


def _has(tool):
    from shutil import which
    return which(tool) is not None


setup(
    name="torch_mps_ext",
    version="0.1.0",
    description="An emulated mps_ext accelerator for PyTorch (PrivateUse1).",
    packages=find_packages(include=["torch_mps_ext", "torch_mps_ext.*"]),
    py_modules=["torch_mps_ext_autoload"],
    package_data={"torch_mps_ext": ["shader/include/*", "shader/include/**/*"]},
    ext_modules=[CMakeExtension("torch_mps_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch==2.13.0"],
    entry_points={"torch.backends": ["mps_ext = torch_mps_ext_autoload:load"]},
    zip_safe=False,
)
