"""Invariance checks: Effective Invariance (:mod:`.ei`), ML4ML variance matrices (:mod:`.variance`), the transforms
they apply (:mod:`.transforms`) and the check stage that runs them on a classifier (:mod:`.check`)."""
