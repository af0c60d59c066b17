"""The additive and selective families: bottleneck adapters, Compacter, (IA)^3, LayerNorm tuning, BitFit."""
