"""surgeon's GrowNorm kernel (Triton: forward and backward, used by PyTorch on CUDA) and its
TensorRT plugin ``surgeon::GrowNorm`` v1 (TensorRT's Python plugin API, ahead-of-time PTX).

Installed with surgeon from the repository's ``plugins/`` folder. ``grownorm_kernel`` needs
``triton``; ``grownorm_trt`` needs ``tensorrt`` 10.9+ as well.
"""
