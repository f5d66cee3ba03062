#!/bin/bash
# hostile_swap.sh: a model directory replaced again and again while
# several sessions use it.
#
#   test/pg/hostile_swap.sh [SECONDS [SESSIONS]]     default 20 s, 4 sessions
#
# SESSIONS sessions call geolocate() back to back with osv5m.model_path set
# to build/hostile-swap/models/live, a symbolic link that this script points
# in turn at a copy of tiny-gelu and of tiny-quickgelu, every 0.1 s, by
# renaming a new link over it (atomic, as an administrator should replace a
# model).  Passes when
# no backend crashed (same pids, server log clean), every failed call is a
# clean config_file_error (F0000: a load that raced with a rename and read
# files of two models) and every session answers correctly at the end.
# The swapper decides when the run ends: the sessions call until it has
# made its last swap and created the file stop, so the swaps span the whole
# run however slowly the sessions start on a busy machine; the verdict
# counts no answer and no swap, and waits for the sessions to end with a
# deadline (SWAP_DEADLINE, default 120 s).
# Makes its own cluster in build/hostile-swap (SWAP_DIR; port SWAP_PORT,
# default 55439); needs the extension installed.
set -u
secs=${1:-20}
sessions=${2:-4}
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
dir=${SWAP_DIR:-$root/build/hostile-swap}
deadline=${SWAP_DEADLINE:-120}
port=${SWAP_PORT:-55439}
models=$dir/models
img=$root/test/data/images/jpeg_224x224.jpg

. test/pg/cluster.sh
trap 'touch "$dir/stop" 2>/dev/null; kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; cluster_stop "$dir"' EXIT
# (jit off: with geolocate's cost every query would be JIT-compiled, which
# takes longer than the call itself with the tiny test models on a slow CPU)
cluster_init "$dir" "$port" "osv5m.threads = 1" "jit = off" || exit 1
dir=$(cd "$dir" && pwd)
models=$dir/models
rm -f "$dir/stop"
mkdir -p "$models"
chmod 755 "$models"
cp -r test/models/tiny-gelu "$models/a" && cp -r test/models/tiny-quickgelu "$models/b" || exit 1
chmod -R a+rX "$models"
ln -s a "$models/live"
cluster_start "$dir" || exit 1
psql -XqAt -v ON_ERROR_STOP=1 <<SQL || exit 1
SET client_min_messages = warning;
CREATE EXTENSION osv5m CASCADE;
ALTER DATABASE postgres SET osv5m.model_path = '$models/live';
CREATE TABLE img AS SELECT pg_read_binary_file('$img') AS img;
SQL
# the two possible answers
answer() {
	psql -XqAt -c "SET osv5m.model_path = '$1'" -c "SELECT geolocate(img) FROM img"
}
gelu=$(answer "$root/test/models/tiny-gelu")
quick=$(answer "$root/test/models/tiny-quickgelu")
[ -n "$gelu" ] && [ -n "$quick" ] && [ "$gelu" != "$quick" ] ||
	{ echo "hostile_swap: the two models must give two answers: '$gelu' '$quick'"; exit 1; }

out=$dir/out; mkdir -p "$out"
session_pids=()
for i in $(seq 1 "$sessions"); do
	# one call at a time: the next is written only when psql has printed
	# the tick that follows the previous one, so nothing queues up in the
	# pipe and the session ends right after the stop, however slow the
	# calls are on this machine
	(
		echo "SELECT pg_backend_pid();"
		while [ ! -e "$dir/stop" ]; do
			size=$(stat -c %s "$out/s$i.out" 2>/dev/null || echo 0)
			printf 'SELECT geolocate(img) FROM img;\n\\echo tick\n'
			# done when the output has grown and ends with the tick
			until [ ! -e "$dir/stop" ] || { [ "$(stat -c %s "$out/s$i.out")" -gt "$size" ] &&
				[ "$(tail -c 5 "$out/s$i.out")" = tick ]; }; do
				sleep 0.005
			done
		done
		echo "SELECT pg_backend_pid();"
	) | psql -XAt >"$out/s$i.out" 2>"$out/s$i.err" &
	session_pids+=($!)
done
swaps=0
end=$((SECONDS + secs))
while [ $SECONDS -lt $end ]; do
	if [ $((swaps % 2)) -eq 0 ]; then m=b; else m=a; fi
	ln -s $m "$models/live.new" && mv -T "$models/live.new" "$models/live"
	swaps=$((swaps + 1))
	sleep 0.1
done
touch "$dir/stop"
fail=0
end=$((SECONDS + deadline))
for p in "${session_pids[@]}"; do
	while kill -0 "$p" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.1; done
done
for p in "${session_pids[@]}"; do
	kill -0 "$p" 2>/dev/null && { echo "hostile_swap: FAIL: a session still runs $deadline s after the stop"; fail=1; break; }
done
kill "${session_pids[@]}" 2>/dev/null
wait "${session_pids[@]}" 2>/dev/null

n_gelu=$(cat "$out"/s*.out | grep -cxF -e "$gelu")
n_quick=$(cat "$out"/s*.out | grep -cxF -e "$quick")
bad_answers=$(cat "$out"/s*.out | grep -vxF -e "$gelu" -e "$quick" -e tick | grep -vcE '^[0-9]+$')
errors=$(cat "$out"/s*.err | grep -c 'ERROR')
other=$(cat "$out"/s*.err | grep -E 'ERROR|FATAL|PANIC|server closed|connection' |
	grep -v 'ERROR:  could not load osv5m model')
echo "hostile_swap: $swaps swaps; answers: $n_gelu of tiny-gelu, $n_quick of tiny-quickgelu;" \
	"$errors clean load errors"
[ "$bad_answers" -eq 0 ] || { echo "hostile_swap: FAIL: $bad_answers answers of neither model"; fail=1; }
[ -z "$other" ] || { echo "hostile_swap: FAIL: other errors:"; echo "$other" | sort | uniq -c | head; fail=1; }
for i in $(seq 1 "$sessions"); do
	pids=$(grep -E '^[0-9]+$' "$out/s$i.out" | paste -sd' ')
	set -- $pids
	[ $# -eq 2 ] && [ "$1" = "$2" ] ||
		{ echo "hostile_swap: FAIL: session $i did not keep one backend to the end (pids: $pids)"; fail=1; }
done
final=$(psql -XqAtc "SELECT geolocate(img) FROM img")
[ "$final" = "$gelu" ] || [ "$final" = "$quick" ] || { echo "hostile_swap: FAIL: final answer: $final"; fail=1; }
test/pg/hostile_log.sh "$dir/server.log" || fail=1
[ $fail -eq 0 ] && echo "hostile_swap: PASS" || echo "hostile_swap: FAIL (outputs in $out)"
exit $fail
