/*
 * libFuzzer target: the PSK file parser of --tls-psk (server/nbd_tls.c,
 * tls_psk_parse), fed the input as the file's bytes, in an exactly-sized
 * heap copy so that AddressSanitizer sees any over-read. Each result is
 * checked against what the format allows: on success every key has a
 * username of 1 to 255 bytes without ':' or control characters, found
 * again by tls_psk_find, no username twice, a key of 1 to 256 bytes; on
 * failure an error line that names a line (or "no keys").
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "nbd_tls.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *text = malloc(size ? size : 1);
	char err[256] = "";
	struct tls_psk *p = NULL;

	if (!text)
		fz_fail("out of memory");
	if (size)
		memcpy(text, data, size);
	int rc = tls_psk_parse(text, size, &p, err, sizeof(err));
	if (rc == 0) {
		if (!p || !p->n)
			fz_fail("success without keys");
		for (size_t i = 0; i < p->n; i++) {
			const struct tls_psk_key *k = &p->keys[i];
			size_t ul = strlen(k->user);
			if (!ul || ul > 255 || strchr(k->user, ':'))
				fz_fail("bad username accepted");
			for (size_t j = 0; j < ul; j++)
				if ((unsigned char)k->user[j] < 0x20 || k->user[j] == 0x7f)
					fz_fail("control character in a username");
			if (!k->keylen || k->keylen > 256)
				fz_fail("key of %zu bytes", k->keylen);
			if (tls_psk_find(p, k->user) != k)
				fz_fail("username %zu not found first at its own entry", i);
		}
		tls_psk_free(p);
	} else {
		if (rc != -EINVAL && rc != -ENOMEM)
			fz_fail("unexpected error %d", rc);
		if (rc == -EINVAL && strncmp(err, "line ", 5) && strcmp(err, "no keys"))
			fz_fail("error without a line: '%s'", err);
	}
	free(text);
	return 0;
}
