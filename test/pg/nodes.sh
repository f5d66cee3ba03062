# nodes.sh: helpers for the tests and benchmarks that run several servers
# on this machine (scale_out.sh, citus.sh, test/bench/scale_out_bench.sh).
# Source it after test/pg/cluster.sh, with these set:
#   base     the directory of the servers: node N lives in $base/nodeN
#   port0    the port of node 0; node N listens on port0 + N
#   deadline seconds a wait_for polls before it fails (tests only)
#   passed, failed   the counters check() adds to (tests only)

node_dir() { echo "$base/node$1"; }
# the directory of node N's socket, also its host name for libpq
node_sock() { cluster_sockdir "$(node_dir "$1")"; }

# q N SQL...: run psql on node N (0: the coordinator)
q() {
	local n=$1; shift
	psql -X -q -At -v ON_ERROR_STOP=1 -h "$(node_sock "$n")" -p $((port0 + n)) \
		-U postgres -d postgres "$@"
}

# check NAME GOT WANT: one TAP line, counted in passed or failed
check() {
	local name=$1 got=$2 want=$3
	if [ "$got" = "$want" ]; then
		passed=$((passed + 1))
		echo "ok $((passed + failed)) - $name"
	else
		failed=$((failed + 1))
		echo "not ok $((passed + failed)) - $name: got '$got', want '$want'"
	fi
}

# wait_for NAME NODE SQL WANT: poll until SQL on NODE prints WANT; after
# $deadline seconds, a failed check NAME
wait_for() {
	local name=$1 n=$2 sql=$3 want=$4 got="" end=$((SECONDS + deadline))
	while :; do
		got=$(q "$n" -c "$sql" 2>/dev/null)
		[ "$got" = "$want" ] && return 0
		if [ $SECONDS -ge $end ]; then
			check "$name (waited ${deadline} s)" "$got" "$want"
			return 1
		fi
		sleep 0.2
	done
}

# stop_nodes N...: stop those nodes (idempotent, quiet)
stop_nodes() {
	local n
	for n in "$@"; do cluster_stop "$(node_dir "$n")" >/dev/null 2>&1; done
}
