/* Prints the vchan control page layout as Xen's own header defines it, for
 * tests/native/test_vchan_layout.py to compare with meshlink's native core. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <xen/io/libxenvchan.h>

int main(void)
{
    printf("{\"left.cons\": %zu, \"left.prod\": %zu, \"right.cons\": %zu, \"right.prod\": %zu, ",
           offsetof(struct vchan_interface, left.cons), offsetof(struct vchan_interface, left.prod),
           offsetof(struct vchan_interface, right.cons), offsetof(struct vchan_interface, right.prod));
    printf("\"left_order\": %zu, \"right_order\": %zu, \"cli_live\": %zu, \"srv_live\": %zu, ",
           offsetof(struct vchan_interface, left_order), offsetof(struct vchan_interface, right_order),
           offsetof(struct vchan_interface, cli_live), offsetof(struct vchan_interface, srv_live));
    printf("\"cli_notify\": %zu, \"srv_notify\": %zu, \"grants\": %zu, \"sizeof\": %zu, ",
           offsetof(struct vchan_interface, cli_notify), offsetof(struct vchan_interface, srv_notify),
           offsetof(struct vchan_interface, grants), sizeof(struct vchan_interface));
    printf("\"ring_shared\": %zu, \"NOTIFY_WRITE\": %d, \"NOTIFY_READ\": %d}\n",
           sizeof(struct ring_shared), VCHAN_NOTIFY_WRITE, VCHAN_NOTIFY_READ);
    return 0;
}
