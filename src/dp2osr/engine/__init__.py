"""The engine: the machinery every stage shares — one resumable sampler, candidate pools, the resumable
scorer, the held-out evaluator and the trainer (setup, loop, checkpoints, objectives).

It builds on `dp2osr.backbones` (every model difference) and `dp2osr.math`; it never imports a stage.
"""
