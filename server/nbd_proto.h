/*
 * NBD wire format (fixed newstyle), from the NBD protocol document, and
 * the pure parsers of what a client sends. Nothing here does I/O.
 */
#ifndef TD_NBD_PROTO_H
#define TD_NBD_PROTO_H

#include <stddef.h>
#include <stdint.h>

#include "byteorder.h"

#define NBD_MAGIC		0x4e42444d41474943ULL	/* "NBDMAGIC" */
#define NBD_IHAVEOPT		0x49484156454F5054ULL	/* "IHAVEOPT" */
#define NBD_REP_MAGIC		0x0003e889045565a9ULL
#define NBD_REQUEST_MAGIC	0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC	0x67446698u
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efu

/* handshake flags (server) and client flags */
#define NBD_FLAG_FIXED_NEWSTYLE	(1u << 0)
#define NBD_FLAG_NO_ZEROES	(1u << 1)
#define NBD_FLAG_C_FIXED_NEWSTYLE NBD_FLAG_FIXED_NEWSTYLE
#define NBD_FLAG_C_NO_ZEROES	NBD_FLAG_NO_ZEROES

/* transmission flags */
#define NBD_FLAG_HAS_FLAGS	(1u << 0)
#define NBD_FLAG_READ_ONLY	(1u << 1)
#define NBD_FLAG_SEND_FLUSH	(1u << 2)
#define NBD_FLAG_SEND_FUA	(1u << 3)
#define NBD_FLAG_ROTATIONAL	(1u << 4)
#define NBD_FLAG_SEND_TRIM	(1u << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES (1u << 6)
#define NBD_FLAG_SEND_DF	(1u << 7)
#define NBD_FLAG_CAN_MULTI_CONN	(1u << 8)
#define NBD_FLAG_SEND_RESIZE	(1u << 9)
#define NBD_FLAG_SEND_CACHE	(1u << 10)
#define NBD_FLAG_SEND_FAST_ZERO	(1u << 11)

/* options */
#define NBD_OPT_EXPORT_NAME	1
#define NBD_OPT_ABORT		2
#define NBD_OPT_LIST		3
#define NBD_OPT_STARTTLS	5
#define NBD_OPT_INFO		6
#define NBD_OPT_GO		7
#define NBD_OPT_STRUCTURED_REPLY 8
#define NBD_OPT_LIST_META_CONTEXT 9
#define NBD_OPT_SET_META_CONTEXT 10
#define NBD_OPT_EXTENDED_HEADERS 11

/* option replies */
#define NBD_REP_ACK		1
#define NBD_REP_SERVER		2
#define NBD_REP_INFO		3
#define NBD_REP_META_CONTEXT	4
#define NBD_REP_ERR(n)		((1u << 31) | (n))
#define NBD_REP_ERR_UNSUP	NBD_REP_ERR(1)
#define NBD_REP_ERR_POLICY	NBD_REP_ERR(2)
#define NBD_REP_ERR_INVALID	NBD_REP_ERR(3)
#define NBD_REP_ERR_PLATFORM	NBD_REP_ERR(4)
#define NBD_REP_ERR_TLS_REQD	NBD_REP_ERR(5)
#define NBD_REP_ERR_UNKNOWN	NBD_REP_ERR(6)
#define NBD_REP_ERR_SHUTDOWN	NBD_REP_ERR(7)
#define NBD_REP_ERR_BLOCK_SIZE_REQD NBD_REP_ERR(8)
#define NBD_REP_ERR_TOO_BIG	NBD_REP_ERR(9)

/* NBD_REP_INFO types */
#define NBD_INFO_EXPORT		0
#define NBD_INFO_NAME		1
#define NBD_INFO_DESCRIPTION	2
#define NBD_INFO_BLOCK_SIZE	3

/* commands */
#define NBD_CMD_READ		0
#define NBD_CMD_WRITE		1
#define NBD_CMD_DISC		2
#define NBD_CMD_FLUSH		3
#define NBD_CMD_TRIM		4
#define NBD_CMD_CACHE		5
#define NBD_CMD_WRITE_ZEROES	6
#define NBD_CMD_BLOCK_STATUS	7

/* command flags */
#define NBD_CMD_FLAG_FUA	(1u << 0)
#define NBD_CMD_FLAG_NO_HOLE	(1u << 1)
#define NBD_CMD_FLAG_DF		(1u << 2)
#define NBD_CMD_FLAG_REQ_ONE	(1u << 3)
#define NBD_CMD_FLAG_FAST_ZERO	(1u << 4)
#define NBD_CMD_FLAG_PAYLOAD_LEN (1u << 5)

/* structured reply chunks */
#define NBD_REPLY_FLAG_DONE	(1u << 0)
#define NBD_REPLY_TYPE_NONE	0
#define NBD_REPLY_TYPE_OFFSET_DATA 1
#define NBD_REPLY_TYPE_OFFSET_HOLE 2
#define NBD_REPLY_TYPE_BLOCK_STATUS 5
#define NBD_REPLY_TYPE_ERROR	((1u << 15) | 1)

/* base:allocation */
#define NBD_STATE_HOLE		(1u << 0)
#define NBD_STATE_ZERO		(1u << 1)

/* error values on the wire */
#define NBD_EPERM	1
#define NBD_EIO		5
#define NBD_ENOMEM	12
#define NBD_EINVAL	22
#define NBD_ENOSPC	28
#define NBD_EOVERFLOW	75
#define NBD_ENOTSUP	95
#define NBD_ESHUTDOWN	108

#define NBD_OPT_HEADER_LEN	16
#define NBD_REQUEST_LEN		28
#define NBD_MAX_STRING		4096	/* export names, context names */
#define NBD_MAX_OPTION_LEN	(64 * 1024)

#define NBD_META_BASE_ALLOCATION "base:allocation"
#define NBD_META_ID_BASE_ALLOCATION 1
/* a vbd's CBT log as qemu names a dirty bitmap; its one flag */
#define NBD_META_DIRTY_CBT "qemu:dirty-bitmap:cbt"
#define NBD_META_ID_DIRTY_CBT 2
#define NBD_STATE_DIRTY		(1u << 0)

struct nbd_request {
	uint16_t flags, type;
	uint64_t cookie, offset;
	uint32_t length;
};

/* Parses a 28-byte request header; -1 on a bad magic. */
int nbd_parse_request(const uint8_t *p, struct nbd_request *req);

/* Payload of NBD_OPT_INFO / NBD_OPT_GO. */
struct nbd_opt_go {
	char name[NBD_MAX_STRING + 1];
	uint16_t nr_info;
	int want_name, want_description, want_block_size;
};
/* 0, or an NBD_REP_ERR_* to send back. */
uint32_t nbd_parse_opt_go(const uint8_t *p, uint32_t len, struct nbd_opt_go *out);

/*
 * Payload of NBD_OPT_LIST/SET_META_CONTEXT: export name, then queries.
 * each(query, len, arg), if not NULL, is called for every query, and only
 * once the whole payload has been found valid.
 */
uint32_t nbd_parse_opt_meta(const uint8_t *p, uint32_t len, char *name,
			    void (*each)(const char *q, uint32_t qlen, void *arg),
			    void *arg, uint32_t *nr_queries);

/* errno -> NBD error value */
uint32_t nbd_errno_to_wire(int err);

#endif
