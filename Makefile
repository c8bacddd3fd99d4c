# tapdiskd: `make` builds build/bin/{tapdiskd,tap-ctl,vhd-util,cbt-util}; `make check`
# runs every test; `make run` starts a demo server; `make bench` compares with
# peers; `make install` / `make deb` install it; `make check-fresh` proves the
# README's commands and the package on a Debian root with nothing installed.
#
# run, check, bench and check-fresh first install the Debian packages they
# need (scripts/install-deps), then build through a second make: the
# pkg-config flags below are computed when make reads this file, which on a
# fresh machine is before the -dev packages are there.

CC      ?= cc
PKGS    := libevent jansson liburing xenstore xengnttab xenevtchn libsystemd libnbd gnutls
PYTHON  := /usr/bin/python3
BUILD   ?= build
SAN     ?=
# one version, the package's
VERSION := $(shell sed -n '1s/^[^(]*(\([^)]*\)).*/\1/p' debian/changelog)

# Goals that install packages first and build in a sub-make, or build nothing.
NOBUILD_GOALS := run check bench check-fresh check-xen deps deb clean uninstall
ifneq ($(filter-out $(NOBUILD_GOALS),$(or $(MAKECMDGOALS),all)),)
ifneq ($(shell pkg-config --exists $(PKGS) && echo ok),ok)
$(error the build needs Debian packages that are missing ($(PKGS) through pkg-config): \
        run `scripts/install-deps build` first (make run and make check do it))
endif
endif
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)

# RBD=0: without librbd; the rbd: driver is left out and its params refused in
# one line (objects do not track this: give it a BUILD of its own, build/norbd)
RBD     ?= 1
ifeq ($(RBD),1)
RBD_CPPFLAGS := -DTD_RBD=1
RBD_LIBS     := -lrbd -lrados
else
RBD_CPPFLAGS := -DTD_RBD=0
RBD_LIBS     :=
endif

WARN    := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
           -Wno-missing-field-initializers
CFLAGS  ?= -O2 -g
ifeq ($(SAN),1)
CFLAGS  := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
LDFLAGS += -fsanitize=address,undefined
endif
# ThreadSanitizer (make check's tsan pass: BUILD=build/tsan SAN=thread): clang's
ifeq ($(SAN),thread)
CC      := clang
CFLAGS  := -O1 -g -fsanitize=thread -fno-omit-frame-pointer
LDFLAGS += -fsanitize=thread
endif
ALL_CFLAGS := -std=c11 -D_GNU_SOURCE $(RBD_CPPFLAGS) -DTAPDISKD_VERSION='"$(VERSION)"' $(WARN) $(CFLAGS) \
              $(PKG_CFLAGS) -MMD -MP
LIBS    := $(PKG_LIBS) $(RBD_LIBS) -luuid -lpthread -lm -lz
# the offline tools link only what their layers use
VHDUTIL_LIBS := $(shell pkg-config --libs libevent liburing libnbd 2>/dev/null) $(RBD_LIBS) -luuid -lpthread -lm -lz
TAPCTL_LIBS  := $(shell pkg-config --libs jansson 2>/dev/null) -lm
CBTUTIL_LIBS := -luuid -lpthread

# Layers, each with its own include path, so that an include the wrong way
# (drivers/ reaching into server/, lib/ into anything) does not compile:
#   control -> (the socket) -> server (server/, server/xen/) -> drivers -> lib
# vhd-util and cbt-util work on files: control/ sees drivers/ and lib/, never server/.
INC_lib     := -Ilib
INC_drivers := -Idrivers $(INC_lib)
INC_server  := -Iserver -Iserver/xen $(INC_drivers)
INC_control := -Icontrol $(INC_drivers)
INC_tests   := -Itests $(INC_server) -Icontrol
$(BUILD)/obj/lib/%.o: INC := $(INC_lib)
$(BUILD)/obj/drivers/%.o: INC := $(INC_drivers)
$(BUILD)/obj/server/%.o: INC := $(INC_server)
$(BUILD)/obj/control/%.o: INC := $(INC_control)
$(BUILD)/obj/tests/%.o: INC := $(INC_tests)

LIB_SRCS    := $(wildcard lib/*.c)
DRV_SRCS    := $(wildcard drivers/*.c)
ifneq ($(RBD),1)
DRV_SRCS    := $(filter-out drivers/rbd.c,$(DRV_SRCS))
endif
SERVER_SRCS := $(filter-out server/main.c,$(wildcard server/*.c)) $(wildcard server/xen/*.c)
CLIENT_SRCS := control/ctl_client.c
CLIENT_OBJS := $(CLIENT_SRCS:%.c=$(BUILD)/obj/%.o)
UNIT_SRCS   := $(wildcard tests/unit/test_*.c)
UNIT_BINS   := $(UNIT_SRCS:tests/unit/%.c=$(BUILD)/tests/%)
LIBTD_LIB   := $(BUILD)/lib/libtd-lib.a
LIBTD_DRV   := $(BUILD)/lib/libtd-drivers.a
LIBTD_SRV   := $(BUILD)/lib/libtd-server.a
# in link order: each archive needs only those after it
LIBTD       := $(LIBTD_SRV) $(LIBTD_DRV) $(LIBTD_LIB)

BINS := $(BUILD)/bin/tapdiskd $(BUILD)/bin/tap-ctl $(BUILD)/bin/vhd-util $(BUILD)/bin/cbt-util
SIM  := $(BUILD)/tests/blkfront_sim $(BUILD)/tests/alloc_probe.so

.PHONY: check-layers all sim deps check check-full check-xen check-unit check-integration check-crash check-asan check-fuzz \
        check-valgrind check-fresh soak run bench clean fuzz fuzz-long install uninstall deb bins
all: $(BINS) $(SIM)
bins: $(BINS)

deps:
	@scripts/install-deps all

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	@echo "  CC      $<"
	@$(CC) $(CPPFLAGS) $(ALL_CFLAGS) $(INC) -c $< -o $@

$(LIBTD_LIB): $(LIB_SRCS:%.c=$(BUILD)/obj/%.o)
$(LIBTD_DRV): $(DRV_SRCS:%.c=$(BUILD)/obj/%.o)
$(LIBTD_SRV): $(SERVER_SRCS:%.c=$(BUILD)/obj/%.o)
$(LIBTD):
	@mkdir -p $(dir $@)
	@rm -f $@ && ar rcs $@ $^

$(BUILD)/bin/tapdiskd: $(BUILD)/obj/server/main.o $(LIBTD)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS)

$(BUILD)/bin/tap-ctl: $(BUILD)/obj/control/tap-ctl.o $(BUILD)/obj/control/top.o $(CLIENT_OBJS)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(TAPCTL_LIBS)

$(BUILD)/bin/vhd-util: $(BUILD)/obj/control/vhd-util.o $(LIBTD_DRV) $(LIBTD_LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(VHDUTIL_LIBS)

$(BUILD)/bin/cbt-util: $(BUILD)/obj/control/cbt-util.o $(LIBTD_DRV) $(LIBTD_LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(CBTUTIL_LIBS)

# the blkif frontend simulator (tests and make bench): libxenstore only
$(BUILD)/tests/blkfront_sim: tests/xen/blkfront_sim.c
	@mkdir -p $(dir $@)
	@echo "  CC      $<"
	@$(CC) -std=c11 $(WARN) $(CFLAGS) -Ilib $(LDFLAGS) -o $@ $< $(shell pkg-config --libs xenstore)

# LD_PRELOAD: heap calls counted (make bench) or failed on demand (the tests)
$(BUILD)/tests/alloc_probe.so: tests/preload/alloc_probe.c
	@mkdir -p $(dir $@)
	@echo "  CC      $<"
	@$(CC) -std=c11 $(WARN) -O2 -fPIC -shared -o $@ $< -ldl

$(BUILD)/tests/%: $(BUILD)/obj/tests/unit/%.o $(LIBTD)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS) -lcmocka

# ---- tests ----

# an include the wrong way between layers does not compile (scripts/check-layers)
check-layers:
	@INC_lib='$(INC_lib)' INC_drivers='$(INC_drivers)' INC_server='$(INC_server)' \
	 INC_control='$(INC_control)' CFLAGS_LAYERS='$(PKG_CFLAGS) $(RBD_CPPFLAGS)' CC='$(CC)' \
	 scripts/check-layers

check:
	@scripts/install-deps check
	@scripts/check

# make check, then the suite against the thread engine, under TSan, under
# ASan/UBSan and under valgrind (CI runs it: .ci/run)
check-full:
	@scripts/install-deps check
	@scripts/check --full

# The README's `make run` and the .deb on a Debian 12 root made by debootstrap
# (tests/fresh/check-fresh; the root is cached under /var/cache/tapdiskd-fresh)
check-fresh:
	@scripts/install-deps fresh
	@tests/fresh/check-fresh

# Linux guests on a real Xen 4.17 under QEMU, disks served by tapdiskd (tests/xen/lab)
check-xen:
	@tests/xen/lab/check-xen

# The power-loss replay with 10,000 crash states per format (tests/crash/RESULTS.md)
check-crash: $(BINS)
	@scripts/install-deps check
	@tests/crash/run

# The soak: 100 vbds under verified I/O, pauses, snapshots, QoS changes,
# force-closes and killed clients for SOAK_MINUTES (default 60; make check
# runs 2), then every byte and the server's RSS and fds (tests/soak/RESULTS.md)
soak: $(BINS) $(BUILD)/tests/blkfront_sim
	@scripts/install-deps check
	@TAPDISKD_BIN_DIR=$(abspath $(BUILD)/bin) tests/soak/run

check-unit: $(UNIT_BINS)
	@set -e; for t in $(UNIT_BINS); do echo "== $$t"; $$t; done

# TAPDISKD_IO_ENGINE chooses the engine the integration suite runs against.
check-integration: $(BINS) $(BUILD)/tests/blkfront_sim
	TAPDISKD_BIN_DIR=$(abspath $(BUILD)/bin) $(PYTHON) -m pytest -q -ra tests/integration $(PYTEST_ARGS)

fuzz:
	@$(MAKE) -s -f tests/fuzz/fuzz.mk

check-fuzz: fuzz
	@tests/fuzz/run-all $(FUZZ_SECONDS)

# every fuzz target for FUZZ_LONG_EXECS executions (10 million: hours of one
# core) on a coverage-only build (build/fuzz-fast), then the corpora once
# under ASan+UBSan (build/fuzz), then tests/fuzz/RESULTS.md;
# FUZZ_LONG_EXECS=200000 is a smoke run
FUZZ_LONG_EXECS ?= 10000000
fuzz-long: fuzz
	@FUZZ_LONG_EXECS=$(FUZZ_LONG_EXECS) tests/fuzz/fuzz-long

run:
	@scripts/install-deps build
	@$(MAKE) --no-print-directory all
	@scripts/run-demo

bench:
	@scripts/install-deps bench
	@$(MAKE) --no-print-directory all
	@bench/run

# ---- install ----
# make install [PREFIX=/usr/local] [DESTDIR=...]; make uninstall removes
# exactly what it installs. block-tap goes where libxl looks for hotplug
# scripts, whatever the prefix; the unit's ExecStart names $(SBINDIR).
PREFIX     ?= /usr/local
SBINDIR    ?= $(PREFIX)/sbin
DATADIR    ?= $(PREFIX)/share
MANDIR     ?= $(DATADIR)/man
XENSCRIPTS ?= /etc/xen/scripts
DEFAULTDIR ?= /etc/default
UNITDIR    ?= $(if $(filter /usr,$(PREFIX)),/lib/systemd/system,$(PREFIX)/lib/systemd/system)
MANPAGES   := $(wildcard docs/man/*.8)
SCHEMAS    := $(wildcard schema/*.json)
INSTALLED  := $(addprefix $(SBINDIR)/,tapdiskd tap-ctl vhd-util cbt-util) $(XENSCRIPTS)/block-tap \
              $(UNITDIR)/tapdiskd.service $(DEFAULTDIR)/tapdiskd \
              $(addprefix $(MANDIR)/man8/,$(notdir $(MANPAGES))) \
              $(addprefix $(DATADIR)/tapdiskd/schema/,$(notdir $(SCHEMAS)))

install: $(BINS)
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(XENSCRIPTS) $(DESTDIR)$(UNITDIR) \
		$(DESTDIR)$(DEFAULTDIR) $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(DATADIR)/tapdiskd/schema
	install -m 0755 $(BINS) $(DESTDIR)$(SBINDIR)/
	install -m 0755 contrib/xl-hotplug/block-tap $(DESTDIR)$(XENSCRIPTS)/block-tap
	sed 's|/usr/sbin/|$(SBINDIR)/|g' contrib/systemd/tapdiskd.service \
		>$(DESTDIR)$(UNITDIR)/tapdiskd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/tapdiskd.service
	install -m 0644 contrib/systemd/tapdiskd.default $(DESTDIR)$(DEFAULTDIR)/tapdiskd
	install -m 0644 $(MANPAGES) $(DESTDIR)$(MANDIR)/man8/
	install -m 0644 $(SCHEMAS) $(DESTDIR)$(DATADIR)/tapdiskd/schema/

uninstall:
	rm -f $(addprefix $(DESTDIR),$(INSTALLED))
	-rmdir $(DESTDIR)$(DATADIR)/tapdiskd/schema $(DESTDIR)$(DATADIR)/tapdiskd 2>/dev/null

# build/deb/tapdiskd_$(VERSION)_amd64.deb, built from a clean copy of HEAD's tree
deb:
	@scripts/install-deps package
	@scripts/build-deb

clean:
	rm -rf build

-include $(wildcard $(BUILD)/obj/*/*.d $(BUILD)/obj/*/*/*.d $(BUILD)/obj/*/*/*/*.d)
