/* Prints blkif layout facts as Xen's own headers define them (x86_64), for
 * tests/native/test_blkring_layout.py to compare with meshlink's native core. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/blkif.h>

int main(void)
{
    printf("{\"req_prod\": %zu, \"req_event\": %zu, \"rsp_prod\": %zu, \"rsp_event\": %zu, "
           "\"ring\": %zu, ",
           offsetof(struct blkif_sring, req_prod), offsetof(struct blkif_sring, req_event),
           offsetof(struct blkif_sring, rsp_prod), offsetof(struct blkif_sring, rsp_event),
           offsetof(struct blkif_sring, ring));
    printf("\"operation\": %zu, \"nr_segments\": %zu, \"handle\": %zu, \"id\": %zu, "
           "\"sector_number\": %zu, \"seg\": %zu, \"first_sect\": %zu, \"last_sect\": %zu, ",
           offsetof(struct blkif_request, operation), offsetof(struct blkif_request, nr_segments),
           offsetof(struct blkif_request, handle), offsetof(struct blkif_request, id),
           offsetof(struct blkif_request, sector_number), offsetof(struct blkif_request, seg),
           offsetof(struct blkif_request_segment, first_sect),
           offsetof(struct blkif_request_segment, last_sect));
    printf("\"rsp_operation\": %zu, \"rsp_status\": %zu, \"discard_flag\": %zu, "
           "\"discard_nr_sectors\": %zu, \"sizeof_request\": %zu, \"sizeof_response\": %zu, "
           "\"sizeof_segment\": %zu, \"sizeof_discard\": %zu, \"sizeof_slot\": %zu, "
           "\"max_segments\": %d, ",
           offsetof(struct blkif_response, operation), offsetof(struct blkif_response, status),
           offsetof(struct blkif_request_discard, flag),
           offsetof(struct blkif_request_discard, nr_sectors), sizeof(struct blkif_request),
           sizeof(struct blkif_response), sizeof(struct blkif_request_segment),
           sizeof(struct blkif_request_discard), sizeof(union blkif_sring_entry),
           BLKIF_MAX_SEGMENTS_PER_REQUEST);
    printf("\"ind_indirect_op\": %zu, \"ind_nr_segments\": %zu, \"ind_handle\": %zu, "
           "\"ind_indirect_grefs\": %zu, \"sizeof_indirect\": %zu, ",
           offsetof(struct blkif_request_indirect, indirect_op),
           offsetof(struct blkif_request_indirect, nr_segments),
           offsetof(struct blkif_request_indirect, handle),
           offsetof(struct blkif_request_indirect, indirect_grefs),
           sizeof(struct blkif_request_indirect));
    printf("\"entries\": [%u, %u, %u, %u, %u], ",
           (unsigned)__CONST_RING_SIZE(blkif, 4096), (unsigned)__CONST_RING_SIZE(blkif, 8192),
           (unsigned)__CONST_RING_SIZE(blkif, 16384), (unsigned)__CONST_RING_SIZE(blkif, 32768),
           (unsigned)__CONST_RING_SIZE(blkif, 65536));
    printf("\"ops\": [%d, %d, %d, %d, %d, %d], \"status\": [%d, %d, %d]}\n",
           BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE,
           BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT, BLKIF_RSP_OKAY, BLKIF_RSP_ERROR,
           BLKIF_RSP_EOPNOTSUPP);
    return 0;
}
