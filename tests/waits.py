"""How long tests wait for what takes as long as the machine takes: a server starting (it compiles), a
request, a subprocess, a condition to become true. These waits only guard against a hang; a test's verdict
must not depend on the machine's load. On a busy 2-core machine (load 6-12) things took up to ~10x their
quiet times here; HANG is far beyond that, and a wait returns as soon as its condition holds."""

HANG = 900  # seconds
