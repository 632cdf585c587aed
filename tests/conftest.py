"""Test setup: import the project's packages from the repository root, and never reach the network."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Pretrained-weight tests load local files only; a silent fallback to the Hugging Face Hub must fail instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
