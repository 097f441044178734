"""Pure math of DP²O-SR: the DPO loss, the hybrid reward, pair curation and HPO weights, Best/Mean/Worst@M
and whether its change is beyond noise, tiling geometry, colour correction, Y-channel PSNR/SSIM, the
degradation presets and a keyed permutation (the data order of large training sets).

Small typed functions on tensors, arrays and tables, with no model, file or device logic: every stage and the
engine build on them, and they import nothing else from dp2osr.
"""
