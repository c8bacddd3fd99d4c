# tapdiskd: `make` builds build/bin/{tapdiskd,tap-ctl}; `make check` runs every
# test; `make run` starts a demo server; `make bench` compares with peers.

CC      ?= cc
PKGS    := libevent jansson liburing xenstore xengnttab xenevtchn
PYTHON  := /usr/bin/python3
BUILD   ?= build
SAN     ?=
VERSION := 0.1.0

PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)

WARN    := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
           -Wno-missing-field-initializers
CFLAGS  ?= -O2 -g
ifeq ($(SAN),1)
CFLAGS  := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
LDFLAGS += -fsanitize=address,undefined
endif
ALL_CFLAGS := -std=c11 -D_GNU_SOURCE -DTAPDISKD_VERSION='"$(VERSION)"' $(WARN) $(CFLAGS) \
              -Iserver -Iserver/xen -Idrivers -Icontrol $(PKG_CFLAGS) -MMD -MP
LIBS    := $(PKG_LIBS) -luuid -lz -lpthread -lm

SERVER_SRCS := $(filter-out server/main.c,$(wildcard server/*.c)) $(wildcard server/xen/*.c) \
               $(wildcard drivers/*.c)
SERVER_OBJS := $(SERVER_SRCS:%.c=$(BUILD)/obj/%.o)
CLIENT_SRCS := control/ctl_client.c
CLIENT_OBJS := $(CLIENT_SRCS:%.c=$(BUILD)/obj/%.o)
UNIT_SRCS   := $(wildcard tests/unit/test_*.c)
UNIT_BINS   := $(UNIT_SRCS:tests/unit/%.c=$(BUILD)/tests/%)
LIBTD       := $(BUILD)/lib/libtapdiskd.a

BINS := $(BUILD)/bin/tapdiskd $(BUILD)/bin/tap-ctl $(BUILD)/bin/vhd-util
SIM  := $(BUILD)/tests/blkfront_sim

.PHONY: all sim deps check check-xen check-unit check-integration check-asan check-fuzz \
        check-valgrind run bench clean fuzz
all: $(BINS) $(SIM)

deps:
	@scripts/install-deps check

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	@echo "  CC      $<"
	@$(CC) $(ALL_CFLAGS) -c $< -o $@

$(LIBTD): $(SERVER_OBJS)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(BUILD)/bin/tapdiskd: $(BUILD)/obj/server/main.o $(LIBTD)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS)

$(BUILD)/bin/tap-ctl: $(BUILD)/obj/control/tap-ctl.o $(BUILD)/obj/control/top.o $(CLIENT_OBJS)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS)

$(BUILD)/bin/vhd-util: $(BUILD)/obj/control/vhd-util.o $(LIBTD)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS)

# the blkif frontend simulator (tests and make bench): libxenstore only
$(BUILD)/tests/blkfront_sim: tests/xen/blkfront_sim.c
	@mkdir -p $(dir $@)
	@echo "  CC      $<"
	@$(CC) -std=c11 $(WARN) $(CFLAGS) $(LDFLAGS) -o $@ $< $(shell pkg-config --libs xenstore)

$(BUILD)/tests/%: $(BUILD)/obj/tests/unit/%.o $(LIBTD)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS) -lcmocka

# ---- tests ----

check: deps
	@scripts/check

# Linux guests on a real Xen 4.17 under QEMU, disks served by tapdiskd (tests/xen/lab)
check-xen:
	@tests/xen/lab/check-xen

check-unit: $(UNIT_BINS)
	@set -e; for t in $(UNIT_BINS); do echo "== $$t"; $$t; done

# TAPDISKD_IO_ENGINE chooses the engine the integration suite runs against.
check-integration: $(BINS) $(BUILD)/tests/blkfront_sim
	TAPDISKD_BIN_DIR=$(abspath $(BUILD)/bin) $(PYTHON) -m pytest -q -ra tests/integration $(PYTEST_ARGS)

fuzz:
	@$(MAKE) -s -f tests/fuzz/fuzz.mk

check-fuzz: fuzz
	@tests/fuzz/run-all $(FUZZ_SECONDS)

run: deps all
	@scripts/run-demo

bench: all
	@scripts/install-deps bench
	@bench/run

clean:
	rm -rf build

-include $(wildcard $(BUILD)/obj/*/*.d $(BUILD)/obj/*/*/*.d $(BUILD)/obj/*/*/*/*.d)
