"""The LyCORIS-style low-rank family: LoHa, LoKr/KronA, MiSS."""
