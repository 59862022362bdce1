"""The floor for run records: every file foldhpc writes into a run directory, and how.

It imports nothing of foldhpc above it (and no torch, except :mod:`.tensorboard`), so every layer
may use it: the file names of a run directory (:mod:`.layout`), atomic writes / fsync / pid checks
(:mod:`.fsio`), ``status.json`` (:mod:`.status`), ``jobs.jsonl`` (:mod:`.history`), logging setup
(:mod:`.logs`), human formatting (:mod:`.fmt`), the TensorBoard writer (:mod:`.tensorboard`), and the
process contract: exit codes (:mod:`.exitcodes`) and ``FOLDHPC_*`` environment names (:mod:`.envvars`).
"""
