"""The explanation engine: hooks, one-pass gradients and the methods of the Grad-CAM family."""
