"""Synthetic data generators: partially labeled abdominal CT hospitals (:mod:`.ct`, anatomy in :mod:`.phantom`)
and chest X-ray hospitals whose reports matter (:mod:`.xray`). They write site folders in the formats
:mod:`fedtextseg.data` reads (NIfTI, PNG + CSV), so a run, a test or a benchmark needs no real data; nothing else in
the library imports them except ``fedtextseg.sites.ensure_data`` (on first use of a data config that asks for them).
"""
