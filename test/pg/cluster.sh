# cluster.sh: a throwaway PostgreSQL cluster inside the project, shared by
# test/run and demo/run.  Source it (bash), then:
#
#   cluster_init DIR PORT [CONF_LINE...]   initdb DIR/data, settings appended
#   cluster_start DIR                      start; exports PGHOST PGPORT PGUSER
#   cluster_stop DIR                       stop (fast, then immediate); idempotent
#   as_pguser CMD...                       run CMD as the server's OS user
#
# Layout: DIR/data (the data directory), DIR/server.log, and the socket in
# DIR/sock (or a short directory under /tmp when DIR is too long for a Unix
# socket path, 107 bytes).  Clients connect over that socket only
# (listen_addresses = ''), as the superuser "postgres", without password.
#
# PostgreSQL refuses to run as root: when run as root, the server runs as
# the unprivileged OS user osv5m (created if missing) and DIR is chowned to
# it; that user must be able to read the project (models, images).

PG_BINDIR=${PG_BINDIR:-$(pg_config --bindir)}
OSV_PGUSER_OS=osv5m

# Run a command as the OS user that owns the cluster.
as_pguser() {
	if [ "$(id -u)" -eq 0 ]; then
		runuser -u "$OSV_PGUSER_OS" -- "$@"
	else
		"$@"
	fi
}

# Create the unprivileged server user when running as root.
cluster_ensure_user() {
	[ "$(id -u)" -eq 0 ] || return 0
	id "$OSV_PGUSER_OS" >/dev/null 2>&1 && return 0
	useradd --system --user-group --no-create-home --home-dir /nonexistent \
		--shell /usr/sbin/nologin "$OSV_PGUSER_OS"
}

# The socket directory of cluster DIR (short enough for sun_path).
cluster_sockdir() {
	local dir=$1
	if [ -f "$dir/sockdir" ]; then
		cat "$dir/sockdir"
	else
		echo "$dir/sock"
	fi
}

# initdb a fresh cluster in DIR/data listening on PORT; extra args are
# postgresql.conf lines.
cluster_init() {
	local dir=$1 port=$2; shift 2
	local sock
	cluster_ensure_user
	cluster_stop "$dir" 2>/dev/null || true
	rm -rf "$dir"
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd)
	sock="$dir/sock"
	# sun_path holds 107 bytes including ".s.PGSQL.NNNNN"
	if [ ${#sock} -gt 90 ]; then
		sock=$(mktemp -d /tmp/osv5m-sock.XXXXXX)
		echo "$sock" >"$dir/sockdir"
	fi
	mkdir -p "$sock"
	echo "$port" >"$dir/port"
	if [ "$(id -u)" -eq 0 ]; then
		chown -R "$OSV_PGUSER_OS:" "$dir" "$sock"
		if ! as_pguser test -r "$dir/port"; then
			echo "cluster.sh: user $OSV_PGUSER_OS cannot read $dir;" \
				"make the project directory world-readable (chmod o+rx on it and its parents)" >&2
			return 1
		fi
	fi
	as_pguser "$PG_BINDIR/initdb" -D "$dir/data" -U postgres --auth=trust \
		--no-sync --encoding=UTF8 --locale=C >"$dir/initdb.log" 2>&1 || {
		cat "$dir/initdb.log" >&2
		return 1
	}
	{
		echo "# added by test/pg/cluster.sh"
		echo "port = $port"
		echo "listen_addresses = ''"
		echo "unix_socket_directories = '$sock'"
		echo "fsync = off"
		echo "synchronous_commit = off"
		echo "full_page_writes = off"
		echo "shared_buffers = 32MB"
		echo "log_line_prefix = '%m [%p] '"
		for line in "$@"; do
			echo "$line"
		done
	} | as_pguser tee -a "$dir/data/postgresql.conf" >/dev/null
}

# Start cluster DIR and export the client environment.
cluster_start() {
	local dir
	dir=$(cd "$1" && pwd)
	export PGHOST PGPORT PGUSER=postgres PGDATABASE=postgres
	PGHOST=$(cluster_sockdir "$dir")
	PGPORT=$(cat "$dir/port")
	if ! as_pguser "$PG_BINDIR/pg_ctl" -D "$dir/data" -l "$dir/server.log" \
		-w -t 60 start >/dev/null; then
		echo "cluster.sh: the server did not start; its log:" >&2
		tail -n 30 "$dir/server.log" >&2
		return 1
	fi
}

# Stop cluster DIR if it runs.
cluster_stop() {
	local dir=$1 sock
	[ -f "$dir/data/postmaster.pid" ] || return 0
	as_pguser "$PG_BINDIR/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >/dev/null 2>&1 ||
		as_pguser "$PG_BINDIR/pg_ctl" -D "$dir/data" -m immediate -w -t 30 stop >/dev/null 2>&1 ||
		true
	if [ -f "$dir/sockdir" ]; then
		sock=$(cat "$dir/sockdir")
		case $sock in /tmp/osv5m-sock.*) rm -rf "$sock" ;; esac
	fi
}

# The postmaster's process id of cluster DIR.
cluster_postmaster_pid() {
	head -n 1 "$1/data/postmaster.pid"
}
