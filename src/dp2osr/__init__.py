"""dp2osr: DP²O-SR — direct perceptual preference optimization for real-world image super-resolution."""

import logging
import warnings

__version__ = "0.1.0"
__all__ = ["SROutput", "SRPipeline"]


def __getattr__(name: str):
    """``dp2osr.SRPipeline`` / ``dp2osr.SROutput``, imported on first use: ``import dp2osr`` loads no torch."""
    if name in __all__:
        from dp2osr import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'dp2osr' has no attribute {name!r}")


class _DropKnownNoise(logging.Filter):
    """Drops one known third-party log line that is no error and names nothing a dp2osr user can act on:
    bitsandbytes (imported by diffusers / peft) logs on every start that its optional CPU 4-bit kernel
    package is missing. Every other record of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKnownNoise())
# diffusers' own FLUX ControlNet imports FluxPosEmbed from its deprecated location (not our import).
warnings.filterwarnings("ignore", message=r"`FluxPosEmbed` is deprecated", category=FutureWarning)
