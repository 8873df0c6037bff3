"""Plain-PyTorch numerical core: closures and tensors in, tensors out. No Lightning imports."""
