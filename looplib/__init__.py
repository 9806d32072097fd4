"""looplib: a pure, composable training loop for PyTorch."""
