"""Test setup: import the project's packages from the repository root, and never reach the network."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Under pytest-xdist (pyproject's addopts: two workers on the 2-core CI machine) every worker, and every train.py /
# eval.py / torchrun it starts, uses one CPU thread: two OpenMP pools of the default two threads on two cores
# wait on each other and make training steps several times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

# Pretrained-weight tests load local files only; a silent fallback to the Hugging Face Hub must fail instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
