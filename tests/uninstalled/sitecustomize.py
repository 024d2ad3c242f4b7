"""Test aid, on PYTHONPATH only: hide an installed harness (``pip install -e .``) from this interpreter and its
children, as on a machine where the checkout was copied but never installed: the GPU machine, where
``benchmarks/gpu_check.sh`` runs with the image's own Python. See ``tests/uninstalled_env.py``."""

import os
import sys

# setuptools' editable install is a meta path finder from a module named __editable___<project>_finder.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
# An older ("compat") editable install or a .pth puts the checkout itself on sys.path; PYTHONPATH stays.
_asked = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") in _asked
               or not os.path.isfile(os.path.join(p or ".", "harness", "__init__.py"))]
