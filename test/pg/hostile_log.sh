#!/bin/sh
# hostile_log.sh: check a server log for crashed backends, after the
# hostile tests (or any test) ran against that server.
#
#   test/pg/hostile_log.sh SERVER_LOG [SINCE_LINE]
#
# Fails (exit 1) and prints the lines when the log shows a backend killed by
# a signal, a backend that exited abnormally, the postmaster's crash
# recovery, a PANIC, a failed assertion or a sanitizer report.  SINCE_LINE
# (default 1) skips the lines before it, so that a caller can check only
# what a test added: wc -l < LOG before the test, plus one.
set -eu
log=${1:?usage: hostile_log.sh SERVER_LOG [SINCE_LINE]}
since=${2:-1}
[ -r "$log" ] || { echo "hostile_log.sh: cannot read $log" >&2; exit 2; }

# (a background worker exiting with code 1 at shutdown is normal, hence
# "server process" for the exit codes)
pattern='terminated by signal|was terminated by|server process .* exited with exit code|'\
'terminating any other active server processes|'\
'all server processes terminated|database system was interrupted|PANIC:|TRAP:|'\
'AddressSanitizer|UndefinedBehaviorSanitizer|runtime error:'
if tail -n "+$since" "$log" | grep -E "$pattern"; then
	echo "hostile_log.sh: FAIL: $log shows a crashed or aborted server process (lines above)"
	exit 1
fi
echo "hostile_log.sh: ok: no crashed server process in $log"
