# pytest setup of the Python package's tests: the package from src/python and the library
# from $KVMEM_LIBRARY (ctest sets both); run by hand, the library of build/ or build-*/.
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "KVMEM_PYTHONPATH_SET" not in os.environ:
    sys.path.insert(0, os.path.join(ROOT, "src", "python"))
if not os.environ.get("KVMEM_LIBRARY"):
    found = sorted(glob.glob(os.path.join(ROOT, "build*", "libkvmem.so")), key=os.path.getmtime)
    if found:
        os.environ["KVMEM_LIBRARY"] = found[-1]
