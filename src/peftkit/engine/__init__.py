"""The method-agnostic engine: configs, the registry, hosting mechanisms, named adapters, targeting, save/load, io."""
