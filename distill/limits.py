"""The documented bounds on what a received share, a config file or a flag may ask for.

A share arrives from outside the hospital and ``distill inspect``/``distill eval`` run on it,
often as a privileged user on a shared server; every number that sets how long they run or
how much memory they take is bounded here, in one place (docs/share-format.md, "Receiving a
share"). This module holds numbers only, so the command line can import it without torch.
"""
from __future__ import annotations

# Recipe of a share (and --epochs of eval/buffer). The MTT reference trains its recipients for
# 1000 epochs (distill.py's epoch_eval_train; reference_defaults.py); ten times that is still a plausible recipe, 1e12 is not.
MAX_EPOCHS = 10_000
# Mini-batch size. The reference uses 256; batches are index slices of tensors held whole, so a
# larger batch only costs activation memory, which the cost check bounds as well.
MAX_BATCH_SIZE = 8192
# Parameters of the network a recipe builds: ResNet-18 has 11 million, VGG-11 about 9 million.
MAX_PARAMS = 200_000_000
# Activations kept for the backward pass of one mini-batch (estimated before the model is built).
MAX_ACTIVATION_BYTES = 64 << 30
# --size of buffer and eval, in pixels per side: 512 x 512 is beyond what distillation does today
# and a MedMNIST training split resized to it already takes some 20 GB as float32.
MAX_SIZE = 512
# Seeds: torch.Generator.manual_seed and numpy take 64-bit values; [0, 2^63) is what every
# seed consumer here (derive_seed, torch, numpy) accepts as a signed 64-bit integer.
SEED_LIMIT = 1 << 63
# Any other integer setting (experts, runs, iterations, ...) fits a signed 64-bit integer.
INT_LIMIT = 1 << 63
# Default of `distill eval --max-hours`: the estimated training time above which eval refuses to start.
MAX_HOURS = 24.0
