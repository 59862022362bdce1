"""More than one process: who am I (:mod:`.env`), talking to the others (:mod:`.group`),
per-rank records and failure attribution (:mod:`.ranks`). ``foldhpc train --nproc N`` starts local
ranks through :mod:`foldhpc.resilience.supervisor`."""
