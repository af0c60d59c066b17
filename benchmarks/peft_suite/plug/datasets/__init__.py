def load_dataset(*a, **k):
    raise RuntimeError("no datasets offline")
