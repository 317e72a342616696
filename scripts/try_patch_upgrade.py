"""For maintainers moving the pin: try pyllmkv's patches (and optionally the build) on another llama-cpp-python.

    python scripts/try_patch_upgrade.py VERSION [--build]

Downloads llama-cpp-python==VERSION's source distribution with pip, extracts the llama.cpp it vendors, and dry-runs
every patch in patches/ against it: prints per file which hunks apply cleanly, with an offset or fuzz, or fail.
With --build, applies the patches and builds libllama with native/ (CMakeLists.txt with
-DPYLLMKV_LLAMA_CPP_PYTHON_VERSION=VERSION) and prints the first compiler errors. Exit status 0 only if everything
applied cleanly (and built).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def vendored_tree(version: str, work: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--no-build-isolation",
                    f"llama-cpp-python=={version}", "-d", str(work)], check=True, capture_output=True)
    sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
        tar.extractall(work, members=members, filter="data")
    return next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))


def dry_run(tree: Path) -> bool:
    clean = True
    for p in sorted((ROOT / "patches").glob("*.patch")):
        out = subprocess.run(["patch", "-p1", "--dry-run", "-i", str(p)], cwd=tree, capture_output=True, text=True)
        print(f"== {p.name}")
        for line in (out.stdout + out.stderr).splitlines():
            bad = re.search(r"FAILED|offset|fuzz|malformed|reversed", line)
            clean &= not bad
            print(("!! " if bad else "   ") + line)
        clean &= out.returncode == 0
    return clean


def build(version: str, work: Path) -> bool:
    cmd = ["cmake", "-S", str(ROOT), "-B", str(work / "build"), "-DCMAKE_BUILD_TYPE=Release",
           f"-DPYLLMKV_LLAMA_CPP_PYTHON_VERSION={version}", f"-DPYLLMKV_DOWNLOAD_DIR={work / 'download'}"]
    for step in (cmd, ["cmake", "--build", str(work / "build"), "--target", "llama", "-j"]):
        out = subprocess.run(step, capture_output=True, text=True)
        if out.returncode != 0:
            errors = [line for line in (out.stdout + out.stderr).splitlines() if "error" in line.lower()]
            print("\n".join(errors[:40]) or out.stderr[-4000:])
            return False
    print("built libllama with native/")
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("version")
    ap.add_argument("--build", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ok = dry_run(vendored_tree(a.version, work))
        print(f"patches {'apply cleanly' if ok else 'need work'} on llama-cpp-python {a.version}")
        if a.build and ok:
            ok = build(a.version, work)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
