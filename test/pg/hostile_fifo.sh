#!/bin/bash
# hostile_fifo.sh: a model directory whose files are FIFOs, in the server
# and in the command-line tool.
#
#   test/pg/hostile_fifo.sh            (after make install and make; ~10 s)
#
# A blocking open(2) of a FIFO sleeps until a writer comes, and a read of a
# FIFO whose writer is silent sleeps until data comes; in a backend neither
# statement_timeout, pg_cancel_backend nor pg_terminate_backend ends that
# sleep.  The core refuses anything but a regular file before any blocking
# call (src/core/file.c).  Here config.json, model.safetensors and the
# quadtree CSV of a copy of test/models/tiny-gelu are each made a FIFO in
# turn (and config.json a FIFO that a silent writer holds open, and the
# pytorch_model.bin of tiny-gelu-pt a FIFO), and:
#   - geolocate() fails at once with "... is not a regular file", not with
#     a statement timeout, and the same session then geolocates with the
#     real model (the backend is alive and its cache is not poisoned);
#   - `osv5m geolocate --model DIR` and `osv5m info --model DIR` exit 2
#     with that message; an image that is a FIFO gets an error line.
# Every client runs under `timeout 30` and the SQL under statement_timeout,
# so the test itself cannot hang; the server log must show no crash.
#
# Uses its own throwaway cluster (build/hostile-fifo, port 55441, or
# $FIFO_TEST_DIR / $FIFO_TEST_PORT).  Prints "ok - NAME" or "FAIL - NAME:
# why"; the last line is "hostile-fifo: N passed, N failed".
set -u
cd "$(dirname "$0")/../.."
root=$(pwd)
source test/pg/cluster.sh

dir=${FIFO_TEST_DIR:-$root/build/hostile-fifo}
port=${FIFO_TEST_PORT:-55441}
model=$dir/model
img=$root/test/data/images/jpeg_224x224.jpg
good=$root/test/models/tiny-gelu
tool=$root/osv5m
[ -x "$tool" ] || tool=$(pg_config --bindir)/osv5m
passed=0
failed=0
writer_pid=

ok() { passed=$((passed + 1)); echo "ok - $1"; }
fail() { failed=$((failed + 1)); echo "FAIL - $1: $2"; }

finish() {
	[ -n "$writer_pid" ] && kill "$writer_pid" 2>/dev/null
	cluster_stop "$dir"
	echo "hostile-fifo: $passed passed, $failed failed"
	[ "$failed" -eq 0 ]
}

cluster_init "$dir" "$port" "osv5m.threads = 1" &&
	cluster_start "$dir" &&
	psql -XqAt -v ON_ERROR_STOP=1 -c "SET client_min_messages = warning" \
		-c "CREATE EXTENSION osv5m CASCADE" \
		-c "CREATE TABLE img AS SELECT pg_read_binary_file('$img') AS img" >/dev/null || {
	fail "setup" "could not start the cluster or create the extension"
	finish
	exit 1
}
log_start=$(($(wc -l <"$dir/server.log") + 1))
want=$(psql -XqAt -c "SET osv5m.model_path = '$good'" -c "SELECT geolocate(img) FROM img")

# A fresh copy of tiny-gelu (or of model $2) with file $1 replaced by a FIFO.
make_model() {
	rm -rf "$model"
	cp -r "${2:-$good}" "$model" && rm -f "$model/$1" && mkfifo "$model/$1" &&
		chmod -R a+rX "$model" && chmod a+rw "$model/$1"
}

# geolocate() with the hostile model, then with the real one, in one session.
check_sql() {
	local name=$1 file=$2 out start ms
	start=$(date +%s%3N)
	out=$(timeout 30 psql -XAt -v ON_ERROR_STOP=0 \
		-c "SET statement_timeout = '10s'" \
		-c "SET osv5m.model_path = '$model'" \
		-c "SELECT geolocate(img) FROM img" \
		-c "SET osv5m.model_path = '$good'" \
		-c "SELECT geolocate(img) FROM img" 2>&1)
	local rc=$?
	ms=$(($(date +%s%3N) - start))
	if [ $rc -eq 124 ]; then
		fail "$name" "psql still waiting after 30 s (the backend hangs)"
	elif ! printf '%s\n' "$out" | grep -q "ERROR:  could not load osv5m model: .*$file.* is not a regular file"; then
		fail "$name" "no 'is not a regular file' error: $(printf '%s' "$out" | tr '\n' ' ')"
	elif [ "$ms" -gt 5000 ]; then
		fail "$name" "the error took $ms ms"
	elif [ "$(printf '%s\n' "$out" | tail -n 1)" != "$want" ]; then
		fail "$name" "the session did not geolocate afterwards: $(printf '%s' "$out" | tail -n 1)"
	else
		ok "$name"
	fi
}

# The tool on the hostile model: exit 2 and the message, never a hang.
check_tool() {
	local name=$1 file=$2 cmd=$3 out rc
	out=$(timeout 30 "$tool" "$cmd" --model "$model" --threads 1 \
		$([ "$cmd" = geolocate ] && echo "$img") 2>&1)
	rc=$?
	if [ $rc -eq 124 ]; then
		fail "$name" "the tool still waiting after 30 s"
	elif [ $rc -ne 2 ] || ! printf '%s\n' "$out" | grep -q "$file\" is not a regular file"; then
		fail "$name" "exit $rc: $(printf '%s' "$out" | tr '\n' ' ')"
	else
		ok "$name"
	fi
}

for file in config.json model.safetensors quadtree_10_1000.csv; do
	make_model "$file" || { fail "$file as a fifo" "could not build the model copy"; continue; }
	check_sql "geolocate with $file a fifo" "$file"
	check_tool "tool geolocate with $file a fifo" "$file" geolocate
	check_tool "tool info with $file a fifo" "$file" info
done

# the PyTorch checkpoint of the published model's layout
make_model pytorch_model.bin "$root/test/models/tiny-gelu-pt" &&
	check_sql "geolocate with pytorch_model.bin a fifo" pytorch_model.bin &&
	check_tool "tool info with pytorch_model.bin a fifo" pytorch_model.bin info

# a FIFO whose writer is open but silent: open(2) would not block, read(2) would
make_model config.json
sleep 3600 <>"$model/config.json" &
writer_pid=$!
check_sql "geolocate with config.json a fifo held open by a silent writer" config.json
check_tool "tool geolocate with config.json a fifo held open by a silent writer" config.json geolocate
kill "$writer_pid" 2>/dev/null
wait "$writer_pid" 2>/dev/null
writer_pid=

# an image that is a FIFO: an error line for that file, the others go on
rm -f "$dir/image.jpg" && mkfifo "$dir/image.jpg"
out=$(timeout 30 "$tool" geolocate --model "$good" --threads 1 "$dir/image.jpg" "$img" 2>&1)
rc=$?
if [ $rc -eq 1 ] && printf '%s\n' "$out" | grep -qF '"error":"file is not a regular file"' &&
	[ "$(printf '%s\n' "$out" | grep -c '"lat"')" -eq 1 ]; then
	ok "tool geolocate of an image that is a fifo"
else
	fail "tool geolocate of an image that is a fifo" "exit $rc: $(printf '%s' "$out" | tr '\n' ' ')"
fi

if out=$(test/pg/hostile_log.sh "$dir/server.log" "$log_start"); then
	ok "no crashed server process"
else
	fail "no crashed server process" "$out"
fi
finish
