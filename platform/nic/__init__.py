"""nic: supervised multitask Neural Image Compression for whole-slide images, on Ray."""

__version__ = "0.1.0"
