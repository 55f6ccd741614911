"""Build llama.cpp from source once per machine: ``python -m engine.llamacpp.build``.

The source is the llama.cpp that ``llama-cpp-python`` (pinned below) vendors, so
the Python binding and the command-line tools are the same llama.cpp.  One
CMake build makes the shared libraries (``libllama``, ``libggml*``) and three
tools (``llama-quantize``, ``llama-perplexity``, ``llama-imatrix``); the binding
is then installed *without* compiling and loads the libraries of that build
through ``LLAMA_CPP_LIB_PATH``.

``GGML_NATIVE=OFF`` with AVX2/FMA/F16C named explicitly: a ``-march=native``
build dies with "Illegal instruction" on these machines (the CPU advertises
AMX).  The build lives in ``~/.cache/layerlab/llama.cpp-<version>`` (or
``$LAYERLAB_LLAMACPP_HOME``), shared by every clone on the machine, and is
skipped when its stamp file is there.  A failed build leaves a log and a
``FAILED`` file; the product then shows llama.cpp features as unavailable with
that reason (see :mod:`engine.llamacpp.runtime`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

BINDING_VERSION = "0.3.36"  # llama-cpp-python; its vendored llama.cpp is the one built
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON", "-DGGML_OPENMP=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON",
    # libraries and tools find each other in the cache folder (lib/ beside bin/), not in the deleted build tree
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN:$ORIGIN/../lib",
)


def home() -> Path:
    """Folder of this machine's llama.cpp build (``bin/``, ``lib/``, ``build.log``, stamps)."""
    default = Path.home() / ".cache" / "layerlab" / f"llama.cpp-{BINDING_VERSION}"
    return Path(os.environ.get("LAYERLAB_LLAMACPP_HOME", default))


def stamp() -> Path:
    return home() / "BUILT"


def failure_file() -> Path:
    return home() / "FAILED"


def _run(cmd: list[str], log, env: dict | None = None, cwd: Path | None = None) -> None:
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, env=env, cwd=cwd)


def _binding_installed() -> bool:
    try:
        from importlib.metadata import version
        return version("llama_cpp_python") == BINDING_VERSION
    except Exception:
        return False


def build(jobs: int | None = None) -> Path:
    """Build (or reuse) llama.cpp and install the binding into this interpreter; returns :func:`home`."""
    target = home()
    if stamp().exists() and _binding_installed():
        return target
    target.mkdir(parents=True, exist_ok=True)
    failure_file().unlink(missing_ok=True)
    jobs = jobs or os.cpu_count() or 2
    started = time.time()
    with open(target / "build.log", "a") as log, tempfile.TemporaryDirectory() as tmp:
        try:
            if not stamp().exists():
                _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                      f"llama-cpp-python=={BINDING_VERSION}", "-d", tmp], log)
                sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
                with tarfile.open(sdist) as tar:
                    tar.extractall(tmp, filter="data")
                source = next(p for p in Path(tmp).iterdir() if p.is_dir()) / "vendor" / "llama.cpp"
                build_dir = Path(tmp) / "build"
                _run(["cmake", "-S", str(source), "-B", str(build_dir), "-G", "Ninja", *CMAKE_FLAGS], log)
                _run(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", "llama", *TOOLS], log)
                for sub in ("bin", "lib"):
                    shutil.rmtree(target / sub, ignore_errors=True)
                    (target / sub).mkdir()
                for tool in TOOLS:
                    shutil.copy2(build_dir / "bin" / tool, target / "bin" / tool)
                for lib in build_dir.rglob("*.so*"):
                    shutil.copy2(lib, target / "lib" / lib.name, follow_symlinks=True)
                sdist_keep = target / sdist.name
                shutil.copy2(sdist, sdist_keep)
                stamp().write_text(f"built in {time.time() - started:.0f} s\n")
            if not _binding_installed():
                sdist_keep = next(target.glob("llama_cpp_python-*.tar.gz"))
                env = dict(os.environ, CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF")
                _run([sys.executable, "-m", "pip", "install", "--quiet", str(sdist_keep)], log, env=env)
        except (subprocess.CalledProcessError, StopIteration, OSError) as exc:
            failure_file().write_text(f"{exc}\nSee {target / 'build.log'}.\n")
            raise
    return target


def main() -> int:
    try:
        where = build()
    except Exception as exc:  # the product works without llama.cpp; say why it is unavailable
        print(f"llama.cpp build failed ({exc}); llama.cpp features stay unavailable. "
              f"Log: {home() / 'build.log'}", file=sys.stderr)
        return 1
    print(f"llama.cpp ready in {where} ({stamp().read_text().strip()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
