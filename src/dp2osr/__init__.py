"""dp2osr: DP²O-SR — direct perceptual preference optimization for real-world image super-resolution."""

__version__ = "0.1.0"
