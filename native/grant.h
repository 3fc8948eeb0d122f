/*
 * grant.h - shared pages from the local grant provider, for rings other than
 * vchan (the blk ring).  vchan builds its pages inside ml_local_server_new /
 * ml_local_client_new; these calls expose the same provider seam on its own:
 * one side shares fresh pages, the other maps them after the same checks.
 *
 * A local grant is a page of one sealed memfd and a grant ref is its page
 * index (docs/vchan.md section 8, "Local provider"), so "granting" pages 0..n-1
 * means handing the peer the memfd.  Implemented in local_grant.c.
 */
#ifndef MESHLINK_GRANT_H
#define MESHLINK_GRANT_H

#include <stddef.h>
#include <stdint.h>

/* cffi:begin -- from here to cffi:end this header is also read by cffi
 * (meshlink/_ffi_build.py): only declarations, integer #defines and enums. */

typedef struct ml_grant_pages ml_grant_pages;

/*
 * Sharing side (the blk frontend): create `npages` zeroed pages, grant refs
 * 0..npages-1, as a memfd sealed against shrinking and growing, mapped
 * read-write.  Returns ML_OK, ML_EINVAL (npages 0 or too large), ML_ENOMEM
 * or ML_ESYS (errno kept).
 */
int ml_local_pages_share(uint32_t npages, ml_grant_pages **out);
/*
 * Mapping side (the blk backend): map all of a peer's memfd read-write after
 * checking that it is sealed against shrinking (else the peer could truncate
 * it and turn our accesses into SIGBUS) and holds exactly `npages` pages (the
 * number the peer announced).  The memfd is not kept: the caller closes it.
 * Returns ML_OK, ML_ECORRUPT (not sealed, wrong size), ML_EINVAL, ML_ENOMEM
 * or ML_ESYS (errno kept).
 */
int ml_local_pages_map(int memfd, uint32_t npages, ml_grant_pages **out);
/* First byte of the pages (grant ref 0) and their length in bytes. */
uint8_t *ml_grant_pages_base(const ml_grant_pages *p);
size_t ml_grant_pages_len(const ml_grant_pages *p);
/* The memfd to pass to the peer (sharing side, until dropped), else -1. */
int ml_grant_pages_fd(const ml_grant_pages *p);
/* Close the memfd once the peer holds it; both mappings keep the pages. */
void ml_grant_pages_drop_fd(ml_grant_pages *p);
/* Unmap and free; p may be NULL. */
void ml_grant_pages_free(ml_grant_pages *p);

/* cffi:end */

#endif
