#!/bin/bash
# demo_download.sh: the demo's download of the published model, against a
# local stand-in for Hugging Face (test/pg/model_server.py on 127.0.0.1,
# serving the test model tiny-gelu-pt in the published layout: config.json
# + pytorch_model.bin, with the SHA-256 headers Hugging Face sends).
#
#   test/pg/demo_download.sh          (after make and make install; ~1 min)
#
#   1. an interrupted download (the server closes after 100 000 bytes)
#      fails, keeps pytorch_model.bin.part and never puts a
#      pytorch_model.bin in place;
#   2. demo/run then continues that partial file with a byte range,
#      verifies it, prints the fingerprint (= sha256sum of the served file)
#      and runs its queries on that model, not on the random fallback;
#   3. a partial file whose bytes are wrong is discarded after the checksum
#      fails; one that belongs to another version of the file is discarded
#      before downloading; a server without byte ranges makes the download
#      start again from zero;
#   4. demo/run --offline makes no request and says loudly that it uses the
#      random test model.
# Prints "ok - NAME" / "FAIL - NAME: why", ends with
# "demo_download: N passed, N failed".
set -u
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
W=$ROOT/build/demo-download
SRC=$ROOT/test/models/tiny-gelu-pt
passed=0
failed=0
ok() { echo "ok - $1"; passed=$((passed + 1)); }
fail() { echo "FAIL - $1: $2"; failed=$((failed + 1)); }
check() { if eval "$2"; then ok "$1"; else fail "$1" "$3"; fi; }

rm -rf "$W"
mkdir -p "$W"
chmod 755 "$W"
SERVER_PID=""
stop_server() {
	[ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
	SERVER_PID=""
}
trap stop_server EXIT
# start_server [ARGS...]: serve SRC; sets URL
start_server() {
	stop_server
	rm -f "$W/port"
	: >"$W/requests.log"
	python3 test/pg/model_server.py "$SRC" "$W/port" "$W/requests.log" "$@" 2>>"$W/server.log" &
	SERVER_PID=$!
	for _ in $(seq 100); do [ -s "$W/port" ] && break; sleep 0.1; done
	URL=http://127.0.0.1:$(cat "$W/port")
}
fetch() { OSV5M_MODEL_URL=$URL demo/fetch-model "$1" >"$2" 2>&1; }
sha=$(sha256sum "$SRC/pytorch_model.bin" | cut -d' ' -f1)
size=$(stat -c %s "$SRC/pytorch_model.bin")

# ---- 1. interrupted -----------------------------------------------------------
start_server --cut-after 100000
M=$W/model
fetch "$M" "$W/1.log"
rc=$?
check "interrupted download fails" '[ $rc -ne 0 ]' "exit $rc (see $W/1.log)"
check "interrupted download is not put in place" '[ ! -e "$M/pytorch_model.bin" ]' \
	"pytorch_model.bin exists"
check "interrupted download keeps its partial file" \
	'[ "$(stat -c %s "$M/pytorch_model.bin.part" 2>/dev/null)" = 100000 ]' \
	"$(ls -l "$M" 2>&1)"
check "config.json verified and in place" \
	'cmp -s "$M/config.json" "$SRC/config.json" && grep -q "config.json verified" "$W/1.log"' \
	"$(cat "$W/1.log")"

# ---- 2. the demo continues it and uses the model ---------------------------------
start_server
OSV5M_MODEL_URL=$URL OSV5M_DOWNLOAD_DIR=$M OSV5M_DEMO_PORT=${DEMO_DOWNLOAD_PORT:-55446} \
	demo/run >"$W/demo.log" 2>&1
rc=$?
check "demo/run succeeds" '[ $rc -eq 0 ]' "exit $rc (see $W/demo.log)"
check "the demo continued the partial file with a byte range" \
	'grep -q "^GET /pytorch_model.bin bytes=100000-$" "$W/requests.log" &&
	 grep -q "continuing pytorch_model.bin from 100000 bytes" "$W/demo.log"' \
	"$(cat "$W/requests.log")"
check "the downloaded file is the served file" 'cmp -s "$M/pytorch_model.bin" "$SRC/pytorch_model.bin"' \
	"files differ"
check "the demo verified the checksum and printed the fingerprint" \
	'grep -q "pytorch_model.bin verified (SHA-256 $sha)" "$W/demo.log" &&
	 grep -q "fingerprint: sha256:$sha" "$W/demo.log"' "$(grep fetch-model "$W/demo.log")"
check "the demo ran on the downloaded model, not the random fallback" \
	'grep -q "\"weights_path\": \"$M/pytorch_model.bin\"" "$W/demo.log" &&
	 ! grep -q "NO REAL MODEL" "$W/demo.log"' "$(grep -n 'weights_path\|NO REAL' "$W/demo.log")"
check "no partial file is left" '[ ! -e "$M/pytorch_model.bin.part" ] && [ ! -e "$M/pytorch_model.bin.part.etag" ]' \
	"$(ls "$M")"

# ---- 3. bad partial files, a server without ranges -------------------------------
M=$W/corrupt
mkdir -p "$M"
head -c 200000 /dev/urandom >"$M/pytorch_model.bin.part"
printf '%s' "$sha" >"$M/pytorch_model.bin.part.etag"
fetch "$M" "$W/3a.log"
rc=$?
check "a partial file with wrong bytes fails the checksum" \
	'[ $rc -ne 0 ] && grep -q "discarded" "$W/3a.log"' "exit $rc: $(cat "$W/3a.log")"
check "and is discarded, nothing put in place" \
	'[ ! -e "$M/pytorch_model.bin" ] && [ ! -e "$M/pytorch_model.bin.part" ]' "$(ls "$M")"
fetch "$M" "$W/3b.log"
check "the next run downloads it whole" 'cmp -s "$M/pytorch_model.bin" "$SRC/pytorch_model.bin"' \
	"$(cat "$W/3b.log")"

M=$W/stale
mkdir -p "$M"
head -c 200000 "$SRC/pytorch_model.bin" >"$M/pytorch_model.bin.part"
printf '%064d' 0 >"$M/pytorch_model.bin.part.etag"
: >"$W/requests.log"
fetch "$M" "$W/3c.log"
check "a partial file of another version is discarded before downloading" \
	'grep -q "belongs to another version" "$W/3c.log" &&
	 grep -q "^GET /pytorch_model.bin -$" "$W/requests.log" &&
	 cmp -s "$M/pytorch_model.bin" "$SRC/pytorch_model.bin"' "$(cat "$W/3c.log" "$W/requests.log")"

start_server --no-range
M=$W/norange
mkdir -p "$M"
head -c 200000 "$SRC/pytorch_model.bin" >"$M/pytorch_model.bin.part"
printf '%s' "$sha" >"$M/pytorch_model.bin.part.etag"
fetch "$M" "$W/3d.log"
check "a server without byte ranges: downloaded again from the start" \
	'grep -q "cannot continue" "$W/3d.log" && cmp -s "$M/pytorch_model.bin" "$SRC/pytorch_model.bin"' \
	"$(cat "$W/3d.log")"
check "the size is the served size" '[ "$(stat -c %s "$M/pytorch_model.bin")" = "$size" ]' "size differs"

# ---- 4. offline ------------------------------------------------------------------
: >"$W/requests.log"
OSV5M_MODEL_URL=$URL OSV5M_DOWNLOAD_DIR=$W/offline OSV5M_DEMO_PORT=${DEMO_DOWNLOAD_PORT:-55446} \
	demo/run --offline >"$W/offline.log" 2>&1
rc=$?
check "demo/run --offline succeeds with the random model and says so" \
	'[ $rc -eq 0 ] && grep -q "NO REAL MODEL" "$W/offline.log" &&
	 grep -q "RANDOM test model and mean nothing" "$W/offline.log"' "exit $rc (see $W/offline.log)"
check "demo/run --offline makes no request" '[ ! -s "$W/requests.log" ] && [ ! -e "$W/offline" ]' \
	"$(cat "$W/requests.log")"

echo "demo_download: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
