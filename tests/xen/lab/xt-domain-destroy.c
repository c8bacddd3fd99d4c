/*
 * xt-domain-destroy DOMID: destroys a domain with the hypercall alone, as a
 * crashed toolstack would leave it: no xenstore cleanup, no hotplug script,
 * nothing told to the backends. What is left to notice it is xenstored's
 * @releaseDomain. (check-xen's "orphan" scenario; gnu11: xenctrl.h needs
 * GNU C.)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>

#include <xenctrl.h>

int
main(int argc, char **argv)
{
	char *end;
	unsigned long domid = argc == 2 ? strtoul(argv[1], &end, 10) : 0;

	if (argc != 2 || *end || domid == 0 || domid >= 0x7ff0) {
		fprintf(stderr, "usage: xt-domain-destroy DOMID (not 0)\n");
		return 2;
	}
	xc_interface *xch = xc_interface_open(NULL, NULL, 0);
	if (!xch) {
		fprintf(stderr, "xt-domain-destroy: cannot open the hypervisor: %s\n", strerror(errno));
		return 1;
	}
	int rc = xc_domain_destroy(xch, (uint32_t)domid);
	int e = errno;
	xc_interface_close(xch);
	if (rc < 0) {
		fprintf(stderr, "xt-domain-destroy %lu: %s\n", domid, strerror(e));
		return 1;
	}
	return 0;
}
