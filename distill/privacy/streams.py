"""Sub-streams of the audit seed: each random choice of the audit draws from its own, so adding one
does not move the others (see distill.seeding.derive_seed)."""

FEATURE, NET_INIT, SHARE_TRAIN, REAL_TRAIN, SUBSET, MEMBERS, BOOT, REFERENCE, RMIA_TRAIN, CANARY = range(10)
