"""fullchain: train, optimise, deploy and watch PyTorch models from one YAML file."""

__version__ = "0.1.0"
