"""Process exit codes, distinct so cron and scripts can tell outcomes apart.

Luigi's own codes come from the `[retcode]` block of config/luigi.cfg (10 already running — Luigi's process lock,
20 missing data, 25 not run, 30 task failed, 35 scheduling error, 40 unhandled exception); ours do not collide.
"""

OK = 0
CONFIG_INVALID = 2
CONFIG_DRIFT = 3
BUDGET_EXCEEDED = 4
WAITING = 5
NOT_FINISHED = 6
UNAVAILABLE = 7
LOCKED = 10
FAILED = 30
STOPPED = 75
