"""The reference code's defaults that this project keeps, each written once, with where it comes from.

Numbers only (no torch), so the command line's config can import them. "MTT" is the code of Cazenavette et
al. 2022 (``buffer.py`` and ``distill.py`` of mtt-distillation); "DC/DSA" is that of Zhao et al. 2021
(``main.py`` of DatasetCondensation), whose training of networks on small sets MTT took over.
"""
from __future__ import annotations

# SGD step size of a network trained on images: MTT's lr_teacher (its experts, and the synthetic step size it
# starts from) and DC/DSA's lr_net (its networks trained on synthetic or random real images), both 0.01.
NETWORK_LR = 0.01
# Epochs of a network trained on a small set: DC/DSA's epoch_eval_train, 300. MTT's distill.py defaults to
# 1000 for the same flag; 300 keeps the evaluation of a share affordable on a CPU.
SMALL_SET_EPOCHS = 300
# Mini-batch of a network trained on images: MTT's batch_train (experts and evaluation), 256.
BATCH = 256
