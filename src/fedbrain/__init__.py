"""fedbrain: federated, privacy-preserving brain-tumour MRI training."""

__version__ = "0.1.0"
