# osv5m: the PostgreSQL extension (PGXS), the osv5m command-line tool and
# the C tests of the core, all from one Makefile.
#
#   make                 the extension (osv5m.so) and the tool (./osv5m)
#   make install         both, into the PostgreSQL found by pg_config
#   make check-core      C unit and fidelity tests of the core
#   make check-asan      the same under AddressSanitizer + UBSan
#   test/run             the whole suite (see README)

EXTENSION = osv5m
MODULE_big = osv5m
DATA = osv5m--0.1.0.sql osv5m--0.1.0--0.2.0.sql osv5m--0.2.0--0.3.0.sql \
	osv5m--0.3.0--0.4.0.sql
PGFILEDESC = "osv5m - photo geolocation with the OSV-5M baseline model"

CORE_SRCS = $(sort $(wildcard src/core/*.c))
CORE_OBJS = $(CORE_SRCS:.c=.o)
PG_SRCS = $(sort $(wildcard src/pg/*.c))
OBJS = $(CORE_OBJS) $(PG_SRCS:.c=.o)

# One portable build: no -march.  The hot loops carry their own target
# attributes and are chosen at run time from the CPU (src/core/gemm.c,
# network.c).  -ffp-contract=off: the compiler never fuses a multiply and an
# add on its own, so every instruction set computes the same bits (the
# kernels fuse explicitly, the same way on every path).
OSV_ARCH ?=
OSV_FPFLAGS = -ffp-contract=off
OSV_LIBS = -ljpeg -lpng -ldl -lm -pthread

PG_CPPFLAGS = -Isrc/core
PG_CFLAGS = -std=gnu11 -O3 -pthread $(OSV_FPFLAGS) $(OSV_ARCH)
SHLIB_LINK = $(OSV_LIBS)

REGRESS = $(patsubst sql/%.sql,%,$(sort $(wildcard sql/*.sql)))
REGRESS_OPTS = --inputdir=. --outputdir=build/regress

EXTRA_CLEAN = osv5m build src/cli/*.o

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# ---- the command-line tool ------------------------------------------------

all: osv5m

src/cli/osv5m.o: src/cli/osv5m.c src/core/osv5m.h
	$(CC) $(CPPFLAGS) -Isrc/core $(CFLAGS) -std=gnu11 -O3 $(OSV_FPFLAGS) $(OSV_ARCH) -c -o $@ $<

osv5m: src/cli/osv5m.o $(CORE_OBJS)
	$(CC) $(CFLAGS) -o $@ $^ $(OSV_LIBS)

$(CORE_OBJS): $(wildcard src/core/*.h)

# the compiler flags live here: a change rebuilds everything
$(OBJS) src/cli/osv5m.o: Makefile

install: install-cli
.PHONY: install-cli
install-cli: osv5m
	$(MKDIR_P) '$(DESTDIR)$(bindir)'
	$(INSTALL_PROGRAM) osv5m '$(DESTDIR)$(bindir)/osv5m'

# the kernels' own rate at the model's shapes, against the FMA peak (a benchmark)
build/gemm_rate: test/bench/gemm_rate.c $(CORE_OBJS)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) -Isrc/core -std=gnu11 -O2 -o $@ $^ $(OSV_LIBS)

# ---- C tests of the core ----------------------------------------------------
# Built outside PGXS: plain (-O2) and under sanitizers, each in its own folder.

TEST_CFLAGS = -std=gnu11 -g -Wall -Wextra -Wno-unused-parameter -pthread $(OSV_FPFLAGS) -Isrc/core -Itest/unit
UNIT_SRCS = $(sort $(wildcard test/unit/test_*.c))
UNIT_SUPPORT = $(filter-out $(UNIT_SRCS),$(wildcard test/unit/*.c))

build/plain/%: test/unit/%.c $(UNIT_SUPPORT) $(CORE_SRCS) $(wildcard src/core/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(TEST_CFLAGS) -O3 $(OSV_ARCH) -o $@ $< $(UNIT_SUPPORT) $(CORE_SRCS) $(OSV_LIBS)

build/asan/%: test/unit/%.c $(UNIT_SUPPORT) $(CORE_SRCS) $(wildcard src/core/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(TEST_CFLAGS) -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all -o $@ $< $(UNIT_SUPPORT) $(CORE_SRCS) $(OSV_LIBS)

UNIT_NAMES = $(patsubst test/unit/%.c,%,$(UNIT_SRCS))

.PHONY: check-core check-asan
check-core: $(addprefix build/plain/,$(UNIT_NAMES))
	@test/unit/run-all build/plain $(UNIT_NAMES)

check-asan: $(addprefix build/asan/,$(UNIT_NAMES))
	@ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 test/unit/run-all build/asan $(UNIT_NAMES)
