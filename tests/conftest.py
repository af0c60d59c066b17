import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=UserWarning, module="peft")
import torch  # noqa: E402  (does not import triton)

# Without a GPU, Triton kernels run in Triton's CPU interpreter (tests/test_kernels.py). The mode is fixed when
# triton is first imported (peft imports it early), so it is set here, before any test module loads. Layers still
# take the PyTorch paths on CPU unless PEFTKIT_TRITON_CPU=1 as well (see peftkit.kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny models gain nothing from a second thread, and on a shared machine it mostly waits to be scheduled.
torch.set_num_threads(1)
