"""gpu-dra-driver: a Kubernetes DRA node driver for NVIDIA GPUs."""

__version__ = "0.1.0"
