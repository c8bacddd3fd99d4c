/* The VHD format library: checksums, encodings, geometry, the size rule,
 * creating into memory and loading back, locators, damage detection. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "vhd_format.h"
#include "../memfile.h"

static void
test_geometry(void **state)
{
	uint16_t c;
	uint8_t h, s;
	(void)state;
	vhd_geometry(100ULL << 20, &c, &h, &s);		/* spec's algorithm by hand */
	assert_int_equal(c, 1003);
	assert_int_equal(h, 12);
	assert_int_equal(s, 17);
	vhd_geometry(40ULL << 30, &c, &h, &s);
	assert_int_equal(s, 255);
	assert_int_equal(h, 16);
	assert_int_equal(c, 20560);
	vhd_geometry(VHD_MAX_SIZE, &c, &h, &s);		/* capped at the maximum */
	assert_int_equal(c, 65535);
	assert_int_equal(h, 16);
	assert_int_equal(s, 255);
	for (uint64_t mb = 1; mb < 70000; mb = mb * 3 + 1) {
		vhd_geometry(mb << 20, &c, &h, &s);
		assert_true((uint64_t)c * h * s <= (mb << 20) / 512);
		assert_true(s == 17 || s == 31 || s == 63 || s == 255);
	}
}

static void
test_size_rule(void **state)
{
	struct vhd_footer f = { .cyls = 1003, .heads = 12, .spt = 17, .curr_size = 100ULL << 20 };
	(void)state;
	memcpy(f.creator_app, "qemu", 4);		/* CHS: 104767488 */
	assert_int_equal(vhd_footer_size(&f), 1003ULL * 12 * 17 * 512);
	memcpy(f.creator_app, "vpc ", 4);
	assert_int_equal(vhd_footer_size(&f), 1003ULL * 12 * 17 * 512);
	for (const char *const *app = (const char *const[]){ "tap\0", "qem2", "win ", "d2v ", "CTXS", NULL };
	     *app; app++) {
		memcpy(f.creator_app, *app, 4);
		assert_int_equal(vhd_footer_size(&f), 100ULL << 20);
	}
	memcpy(f.creator_app, "qemu", 4);
	f.cyls = 65535;
	f.heads = 16;
	f.spt = 255;
	assert_int_equal(vhd_footer_size(&f), 100ULL << 20);	/* max CHS: the bytes */
}

static void
test_footer_roundtrip_and_damage(void **state)
{
	struct vhd_footer f = { 0 }, g;
	uint8_t buf[512];
	char why[128];
	(void)state;
	memcpy(f.cookie, "conectix", 8);
	f.features = 2;
	f.version = 0x10000;
	f.data_offset = 512;
	f.curr_size = f.orig_size = 8 << 20;
	f.type = VHD_TYPE_DYNAMIC;
	f.hidden = 1;
	memcpy(f.creator_app, "tap\0", 4);
	vhd_footer_encode(&f, buf);
	assert_int_equal(vhd_footer_decode(buf, &g, why, sizeof(why)), 0);
	assert_int_equal(g.hidden, 1);
	assert_int_equal(g.curr_size, 8 << 20);
	assert_int_equal(g.checksum, vhd_checksum(buf, 512, 64));
	buf[100] ^= 1;
	assert_int_not_equal(vhd_footer_decode(buf, &g, why, sizeof(why)), 0);
	assert_non_null(strstr(why, "checksum"));
	buf[0] = 'X';
	assert_int_not_equal(vhd_footer_decode(buf, &g, why, sizeof(why)), 0);
	assert_non_null(strstr(why, "cookie"));
}

static void
test_create_and_load_dynamic(void **state)
{
	struct memfile mf = { 0 };
	struct vhd_create c = { .size = 64ULL << 20, .type = VHD_TYPE_DYNAMIC,
				.child_path = "/x/a.vhd" };
	struct td_error err;
	struct vhd_meta m;
	(void)state;
	assert_int_equal(vhd_create_write(&c, mem_write, &mf, &err), 0);
	assert_int_equal(vhd_meta_load(&m, mem_read, &mf, mf.size, "/x", NULL, &err), 0);
	assert_int_equal(m.size, 64ULL << 20);
	assert_int_equal(m.nr_blocks, 32);
	assert_int_equal(m.header.block_size, VHD_BLOCK_DEFAULT);
	assert_int_equal(m.bitmap_bytes, 512);
	assert_true(m.has_batmap);
	assert_int_equal(m.warning[0], 0);
	for (uint32_t i = 0; i < m.nr_blocks; i++)
		assert_int_equal(m.bat[i], VHD_BAT_UNUSED);
	char out[256];
	assert_int_equal(vhd_meta_check_blocks(&m, mem_read, &mf, out, sizeof(out)), 0);
	/* the backup footer equals the footer */
	assert_memory_equal(mf.data, mf.data + mf.size - 512, 512);
	vhd_meta_free(&m);
	/* a truncated file is refused */
	assert_int_not_equal(vhd_meta_load(&m, mem_read, &mf, mf.size - 512, "/x", NULL, &err), 0);
	/* so is a size beyond the format's ceiling, at creation */
	c.size = VHD_MAX_SIZE + VHD_BLOCK_DEFAULT;
	assert_int_equal(vhd_create_write(&c, mem_write, &mf, &err), -EFBIG);
	assert_non_null(strstr(err.msg, "2040 GiB"));
	free(mf.data);
}

static void
test_differencing_locators(void **state)
{
	struct memfile mf = { 0 };
	uint8_t puuid[16] = { 1, 2, 3 };
	struct vhd_create c = { .size = 8 << 20, .type = VHD_TYPE_DIFF,
				.parent_path = "/srv/golden/base image.vhd",
				.child_path = "/srv/vms/vm1/disk.vhd",
				.parent_uuid = puuid, .parent_ts = 42 };
	struct td_error err;
	struct vhd_meta m;
	(void)state;
	assert_int_equal(vhd_create_write(&c, mem_write, &mf, &err), 0);
	assert_int_equal(vhd_meta_load(&m, mem_read, &mf, mf.size, "/srv/vms/vm1", NULL, &err), 0);
	/* the first locator (MacX, relative) resolves against the child's dir */
	assert_string_equal(m.parent_path, "/srv/vms/vm1/../../golden/base image.vhd");
	assert_false(m.parent_raw);
	assert_memory_equal(m.header.parent_uuid, puuid, 16);
	assert_int_equal(m.header.loc[0].code, VHD_PLAT_MACX);
	assert_int_equal(m.header.loc[1].code, VHD_PLAT_W2KU);
	assert_int_equal(m.header.loc[2].code, VHD_PLAT_W2RU);
	char name[64];
	size_t n = 0;
	while (m.header.parent_name[n] || m.header.parent_name[n + 1])
		n += 2;
	assert_int_equal(vhd_utf16_to_utf8(m.header.parent_name, n, 1, name, sizeof(name)), 0);
	assert_string_equal(name, "base image.vhd");
	vhd_meta_free(&m);
	free(mf.data);
	/* a raw parent has a nil uuid */
	memset(&mf, 0, sizeof(mf));
	c.parent_uuid = NULL;
	assert_int_equal(vhd_create_write(&c, mem_write, &mf, &err), 0);
	assert_int_equal(vhd_meta_load(&m, mem_read, &mf, mf.size, "/srv/vms/vm1", NULL, &err), 0);
	assert_true(m.parent_raw);
	vhd_meta_free(&m);
	free(mf.data);
}

/* A parent found by its absolute Windows-form locator alone (W2ku). */
static void
test_absolute_windows_locator(void **state)
{
	struct memfile mf = { 0 };
	uint8_t puuid[16] = { 9 };
	struct vhd_create c = { .size = 4 << 20, .type = VHD_TYPE_DIFF,
				.parent_path = "/srv/p.vhd", .child_path = "/srv/c.vhd",
				.parent_uuid = puuid };
	struct td_error err;
	struct vhd_meta m;
	uint8_t hbuf[VHD_HEADER_SIZE];
	size_t n;
	(void)state;
	assert_int_equal(vhd_create_write(&c, mem_write, &mf, &err), 0);
	assert_int_equal(vhd_meta_load(&m, mem_read, &mf, mf.size, "/srv", NULL, &err), 0);
	struct vhd_header h = m.header;
	vhd_meta_free(&m);
	/* keep only loc[1], rewritten as "C:\\srv\\p.vhd" */
	h.loc[0].code = h.loc[2].code = VHD_PLAT_NONE;
	h.loc[0].data_space = h.loc[2].data_space = 0;
	h.loc[0].data_len = h.loc[2].data_len = 0;
	h.loc[0].data_offset = h.loc[2].data_offset = 0;
	uint8_t text[64];
	assert_int_equal(vhd_utf8_to_utf16("C:\\srv\\p.vhd", 0, text, sizeof(text), &n), 0);
	h.loc[1].data_len = (uint32_t)n;
	memcpy(mf.data + h.loc[1].data_offset, text, n);
	vhd_header_encode(&h, hbuf);
	memcpy(mf.data + 512, hbuf, sizeof(hbuf));
	assert_int_equal(vhd_meta_load(&m, mem_read, &mf, mf.size, "/elsewhere", NULL, &err), 0);
	assert_string_equal(m.parent_path, "/srv/p.vhd");
	vhd_meta_free(&m);
	free(mf.data);
}

static void
test_utf16(void **state)
{
	uint8_t b[64];
	char back[64];
	size_t n;
	(void)state;
	assert_int_equal(vhd_utf8_to_utf16("d\xc3\xa9j\xc3\xa0.vhd", 0, b, sizeof(b), &n), 0);
	assert_int_equal(n, 16);
	assert_int_equal(b[2], 0xe9);	/* é, little-endian */
	assert_int_equal(vhd_utf16_to_utf8(b, n, 0, back, sizeof(back)), 0);
	assert_string_equal(back, "d\xc3\xa9j\xc3\xa0.vhd");
	/* an unpaired surrogate is not text */
	uint8_t bad[2] = { 0x00, 0xd8 };
	assert_int_not_equal(vhd_utf16_to_utf8(bad, 2, 0, back, sizeof(back)), 0);
	/* too long for the room */
	assert_int_not_equal(vhd_utf8_to_utf16("abcdefghijklmnop", 1, b, 8, &n), 0);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_geometry),
		cmocka_unit_test(test_size_rule),
		cmocka_unit_test(test_footer_roundtrip_and_damage),
		cmocka_unit_test(test_create_and_load_dynamic),
		cmocka_unit_test(test_differencing_locators),
		cmocka_unit_test(test_absolute_windows_locator),
		cmocka_unit_test(test_utf16),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
