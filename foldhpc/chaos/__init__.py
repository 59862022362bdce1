"""``foldhpc chaos``: prove that training survives faults, by injecting many of them.

A chaos run trains the same config twice: once without interruptions (the reference) and once
under a seeded, random schedule of faults -- preemption signals, SIGKILL at any moment or during
a checkpoint write, exceptions, crashes and hangs restarted by the supervisor, damaged
checkpoints, an unwritable checkpoint directory, non-finite steps -- and then checks that every
fault was recovered from, how much work each cost (steps lost, time to the first resumed step),
and that the final training state is bit-for-bit the reference's (equal state digests).

Why a separate tool and not more tests: each test proves one scenario once; recovery bugs hide in
the interleavings (a kill while an async save is in flight, a damaged file right after a
restart, a hang after a rollback). Hundreds of seeded faults in one run find those, and the
seed makes any failure replayable.

Modules: :mod:`.kinds` (what each fault is and how it is recovered), :mod:`.schedule` (the
seeded plan), :mod:`.eventtail` (reading ``events.jsonl`` as it grows), :mod:`.local` (the runner
that drives real ``foldhpc train`` processes), :mod:`.report` (verdict, report.md/json, PNG),
:mod:`.command` (the CLI).
"""
