import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=UserWarning, module="peft")

import torch  # noqa: E402

# Tiny models gain nothing from a second thread, and on a shared machine it mostly waits to be scheduled.
torch.set_num_threads(1)
