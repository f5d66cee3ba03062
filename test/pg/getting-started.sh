#!/bin/bash
# getting-started.sh: the README's "Getting started" section as a new user
# types it, one statement at a time, each in a session of its own.
#
#   test/pg/getting-started.sh        (after make install; about 10 s)
#
# It makes a fresh cluster WITHOUT osv5m in shared_preload_libraries (a
# new user's server), in build/getting-started (GETTING_STARTED_DIR; port
# GETTING_STARTED_PORT, default 55443), and reads the ```sql blocks of the
# section "## Getting started" of README.md, with the substitutions of
# readme-examples.sh (/srv/osv5m/baseline becomes the test model tiny-gelu,
# /path/to/photo.jpg a test image).  Each statement (lines up to one ending
# with ";", after any "--" comment) runs in a new psql session, fed on
# standard input as if typed; several statements on one line (LOAD, then
# ALTER SYSTEM) share that line's session.  It checks that
#   - the cluster does not preload osv5m, and that PostgreSQL really
#     refuses ALTER SYSTEM SET osv5m.model_path in a session that has not
#     loaded the library (the reason the README gives for its LOAD; on
#     PostgreSQL 17 and later this check is skipped),
#   - every statement runs without an error,
#   - the section's last query prints a point for the photo,
#   - in yet another session: osv5m.model_path is the model set, every
#     photo has a location, and geolocate() of the image equals it.
# Prints "ok - NAME" / "FAIL - NAME: why" and ends with
# "getting started: N passed, N failed".
set -u
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
MODEL=$ROOT/test/models/tiny-gelu
PHOTO=$ROOT/test/data/images/jpeg_224x224.jpg
DIR=${GETTING_STARTED_DIR:-$ROOT/build/getting-started}
PORT=${GETTING_STARTED_PORT:-55443}
. test/pg/cluster.sh

passed=0
failed=0
ok() { echo "ok - $1"; passed=$((passed + 1)); }
fail() { echo "FAIL - $1: $2"; failed=$((failed + 1)); }
finish() {
	echo "getting started: $passed passed, $failed failed"
	[ "$failed" -eq 0 ]
	exit $?
}

cluster_init "$DIR" "$PORT" || { fail cluster "initdb"; finish; }
DIR=$(cd "$DIR" && pwd)
trap 'cluster_stop "$DIR"' EXIT
cluster_start "$DIR" || { fail cluster "the server did not start"; finish; }
WORK=$DIR/statements
mkdir -p "$WORK"

# The statements of the section, one file each.
awk -v dir="$WORK" -v model="$MODEL" -v photo="$PHOTO" '
	/^## / { section = ($0 == "## Getting started") }
	!section { next }
	/^```sql[ \t]*$/ { inside = 1; next }
	/^```/ && inside { inside = 0; next }
	!inside { next }
	{
		gsub("/srv/osv5m/baseline", model); gsub("/path/to/photo.jpg", photo)
		if (stmt == "" && $0 ~ /^[ \t]*(--.*)?$/) next
		stmt = stmt $0 "\n"
		line = $0; sub(/[ \t]*--.*$/, "", line)
		if (line ~ /;[ \t]*$/) {
			file = sprintf("%s/%02d.sql", dir, ++n); printf "%s", stmt > file; close(file); stmt = ""
		}
	}
' README.md
count=$(ls "$WORK"/*.sql 2>/dev/null | wc -l)
if [ "$count" -ge 5 ] && grep -q "ALTER SYSTEM SET osv5m.model_path" "$WORK"/*.sql; then
	ok "statements ($count statements in the section, ALTER SYSTEM among them)"
else
	fail statements "$count statements found in the section \"Getting started\" of README.md"
	finish
fi

# The user's situation: no preloading, and ALTER SYSTEM refused without the
# library (after the extension exists, so that only loading is missing).
preload=$(psql -X -At -c "SHOW shared_preload_libraries")
[ -z "$preload" ] && ok "no_preload (shared_preload_libraries is empty)" ||
	fail no_preload "shared_preload_libraries = '$preload'"

# Run the statements, each in a fresh session.
for f in "$WORK"/*.sql; do
	stmt=$(tr '\n' ' ' <"$f" | sed 's/  */ /g; s/ $//')
	if grep -q "ALTER SYSTEM SET osv5m" "$f"; then
		# what happens without the LOAD in front (PostgreSQL 15 and 16)
		bare=$(grep -o "ALTER SYSTEM SET osv5m[^;]*;" "$f")
		if [ "$(psql -X -At -c "SELECT current_setting('server_version_num')::int >= 170000")" = t ]; then
			echo "note: PostgreSQL 17 or later: ALTER SYSTEM without LOAD is not checked"
		elif out=$(psql -X -q -v ON_ERROR_STOP=1 -c "$bare" 2>&1); then
			fail alter_system_needs_load "a fresh session accepted '$bare' without LOAD: the README's reason is wrong"
		elif printf '%s' "$out" | grep -q 'unrecognized configuration parameter "osv5m\.'; then
			ok "alter_system_needs_load (a fresh session without LOAD gets: $(printf '%s' "$out" | head -n 1))"
		else
			fail alter_system_needs_load "unexpected error: $out"
		fi
	fi
	if out=$(psql -X -v ON_ERROR_STOP=1 -d postgres <"$f" 2>&1) &&
		! printf '%s' "$out" | grep -qE '^(ERROR|FATAL|psql:)'; then
		ok "statement $(basename "$f" .sql): $stmt"
		last_out=$out
	else
		fail "statement $(basename "$f" .sql)" "$stmt: $(printf '%s' "$out" | tail -n 3)"
		last_out=""
	fi
done

# The section's last statement lists the photos and their locations.
if printf '%s' "$last_out" | grep -qE '^ *1 \| POINT\(-?[0-9.]+ -?[0-9.]+\)'; then
	ok "located ($(printf '%s' "$last_out" | grep -m1 POINT | sed 's/^ *//'))"
else
	fail located "the last statement printed: $last_out"
fi

# Yet another session: the model set, and geolocate() of every photo.
out=$(psql -X -At -F ' ' -v ON_ERROR_STOP=1 -d postgres 2>&1 <<'EOF'
SHOW osv5m.model_path;
SELECT count(*), count(loc), count(*) FILTER (WHERE ST_AsEWKB(loc::geometry) = ST_AsEWKB(geolocate(img)::geometry)) FROM photos;
EOF
)
set -- $out
if [ $# -eq 4 ] && [ "$1" = "$MODEL" ] && [ "$2" -ge 1 ] && [ "$3" = "$2" ] && [ "$4" = "$2" ]; then
	ok "geolocate (another session: osv5m.model_path = $1; $2 photos, all located, geolocate() equal for $4)"
else
	fail geolocate "expected the model path and N N N; got: $out"
fi

finish
