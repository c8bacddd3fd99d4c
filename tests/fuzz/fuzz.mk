# libFuzzer targets. Run from the repository root:
#   make -f tests/fuzz/fuzz.mk            # builds build/fuzz/fuzz_*
#   tests/fuzz/run-all [SECONDS]          # builds and fuzzes each target
#
# The server and driver sources are compiled with the same sanitizers as the
# harnesses (coverage instrumentation without libFuzzer's main) into one
# archive; each target pulls from it only the objects it needs: every
# target that builds a server gets the real control command table
# (control_cmds.c) and the simulated Xen port (port_sim.c) with it.
# main.c has its own main(). No librbd: the rbd: driver is left out (as with
# make RBD=0); its params parser (rbd_params.c) has a target of its own
# (fuzz_rbd_params). No worker threads (IO_CALL_THREADS=0,
# IO_POOL_THREADS=0): blocking calls (opens, closes) run on the loop, a turn
# after they were asked, in order, so that an input replays the same way and
# costs no thread switch (lib/workq.c).

FUZZ_CC    ?= clang
FUZZ_BUILD ?= build/fuzz
# Sanitizers besides libFuzzer's coverage; FUZZ_EXTRA_CFLAGS goes everywhere.
# Use another FUZZ_BUILD for other flags (objects do not track flag changes):
#   fuzz past a known finding while it is being fixed:
#     FUZZ_BUILD=build/fuzz-x FUZZ_EXTRA_CFLAGS=-fno-sanitize=nonnull-attribute
#   a source coverage report of the corpora (see run-all --coverage):
#     FUZZ_BUILD=build/fuzz-cov FUZZ_SAN= \
#     FUZZ_EXTRA_CFLAGS="-fprofile-instr-generate -fcoverage-mapping"
FUZZ_SAN          ?= address,undefined
FUZZ_EXTRA_CFLAGS ?=
comma := ,
FUZZ_SAN_LIST := $(if $(strip $(FUZZ_SAN)),$(comma)$(strip $(FUZZ_SAN)))
FUZZ_PKGS  := libevent jansson liburing xenstore xengnttab xenevtchn libsystemd libnbd gnutls

FUZZ_PKG_CFLAGS := $(shell pkg-config --cflags $(FUZZ_PKGS))
FUZZ_LIBS       := $(shell pkg-config --libs $(FUZZ_PKGS)) -luuid -lpthread -lm -lz

FUZZ_COMMON := -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1 \
               -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -Iserver -Iserver/xen -Idrivers -Ilib -Itests \
               $(FUZZ_PKG_CFLAGS) $(FUZZ_EXTRA_CFLAGS) -MMD -MP
# library objects: instrumented for coverage, no main from libFuzzer
FUZZ_LIB_CFLAGS := -fsanitize=fuzzer-no-link$(FUZZ_SAN_LIST) $(FUZZ_COMMON) -DIO_CALL_THREADS=0 -DIO_POOL_THREADS=0
FUZZ_CFLAGS     := -fsanitize=fuzzer$(FUZZ_SAN_LIST) $(FUZZ_COMMON)
FUZZ_LDFLAGS    := -fsanitize=fuzzer$(FUZZ_SAN_LIST) $(FUZZ_EXTRA_CFLAGS)

FUZZ_LIB_SRCS := $(filter-out server/main.c,$(wildcard server/*.c)) \
                 $(wildcard server/xen/*.c) \
                 $(filter-out drivers/rbd.c,$(wildcard drivers/*.c)) $(wildcard lib/*.c)
FUZZ_LIB_OBJS := $(FUZZ_LIB_SRCS:%.c=$(FUZZ_BUILD)/obj/%.o)
FUZZ_LIB      := $(FUZZ_BUILD)/libtd-fuzz.a

FUZZ_TARGETS := fuzz_nbd fuzz_nbd_proto fuzz_control fuzz_vhd_meta fuzz_qcow2_meta fuzz_blkif fuzz_vmdk_meta \
                fuzz_cbt_log fuzz_rbd_params fuzz_tls_psk
FUZZ_BINS    := $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/%)

.PHONY: all clean
.SECONDARY:
all: $(FUZZ_BINS)

$(FUZZ_BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	@echo "  CC      $< (fuzz)"
	@$(FUZZ_CC) $(FUZZ_LIB_CFLAGS) -c $< -o $@

$(FUZZ_BUILD)/obj/tests/fuzz/%.o: tests/fuzz/%.c
	@mkdir -p $(dir $@)
	@echo "  CC      $<"
	@$(FUZZ_CC) $(FUZZ_CFLAGS) -c $< -o $@

$(FUZZ_LIB): $(FUZZ_LIB_OBJS)
	@mkdir -p $(dir $@)
	@rm -f $@ && ar rcs $@ $^

$(FUZZ_BUILD)/%: $(FUZZ_BUILD)/obj/tests/fuzz/%.o $(FUZZ_LIB)
	@echo "  LD      $@"
	@$(FUZZ_CC) $(FUZZ_LDFLAGS) -o $@ $< $(FUZZ_LIB) $(FUZZ_LIBS)

clean:
	rm -rf $(FUZZ_BUILD)

-include $(shell find $(FUZZ_BUILD)/obj -name '*.d' 2>/dev/null)
