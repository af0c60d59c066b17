"""The orthogonal family: OFT, BOFT, HRA."""
