"""The read side of a search: best trial, reports and plots, retrain-and-test, dashboard, exports.

Everything here reads a study (through `hpopt.storage.open_storage`) and never changes a trial;
the only writes to the study are `retrain`'s "test_result" user attribute.
"""
