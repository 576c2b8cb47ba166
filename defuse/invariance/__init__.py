"""Invariance checks: Effective Invariance (:mod:`.ei`), ML4ML variance matrices (:mod:`.variance`), the assessor
(:mod:`.assessor`) and one classifier's checks, paired and saved (:mod:`.check`); the transforms they apply live
below the models, in :mod:`defuse.transforms`."""
