/* Declarations of native/vchan.h exported to Python (cffi cdef syntax:
 * no includes, no macros with expressions). */
typedef struct ml_vchan ml_vchan;
#define ML_OK 0
#define ML_ECORRUPT -2
#define ML_EINVAL -3
#define ML_ETOOBIG -4
#define ML_ENOMEM -5
#define ML_ESYS -6
#define ML_ECLOSED -7

size_t ml_vchan_header_size(void);
size_t ml_vchan_field_offset(int field);
size_t ml_vchan_inpage_offset(int order);
size_t ml_vchan_ring_pages(int order);
int ml_vchan_choose_orders(size_t read_min, size_t write_min, int *left_order,
                           int *right_order);
int ml_vchan_ctrl_init(void *page, int left_order, int right_order,
                       const uint32_t *grants, size_t ngrants);

long ml_vchan_read(ml_vchan *v, void *buf, size_t n);
long ml_vchan_write(ml_vchan *v, const void *buf, size_t n);
long ml_vchan_recv(ml_vchan *v, void *buf, size_t n);
long ml_vchan_send(ml_vchan *v, const void *buf, size_t n);
long ml_vchan_peek(ml_vchan *v, size_t *offset);
const uint8_t *ml_vchan_read_base(const ml_vchan *v);
long ml_vchan_consume(ml_vchan *v, size_t n);
long ml_vchan_data_ready(ml_vchan *v);
long ml_vchan_buffer_space(ml_vchan *v);
size_t ml_vchan_read_size(const ml_vchan *v);
size_t ml_vchan_write_size(const ml_vchan *v);
long ml_vchan_arm_read(ml_vchan *v);
long ml_vchan_arm_write(ml_vchan *v);
int ml_vchan_peer_live(ml_vchan *v);
int ml_vchan_is_server(const ml_vchan *v);
int ml_vchan_close(ml_vchan *v);
int ml_vchan_notify(ml_vchan *v);
void ml_vchan_free(ml_vchan *v);
int ml_local_server_new(int left_order, int right_order, int own_evfd,
                        int peer_evfd, ml_vchan **out);
int ml_local_memfd(const ml_vchan *v);
int ml_local_client_new(int memfd, uint32_t ctrl_ref, int own_evfd,
                        int peer_evfd, ml_vchan **out);
int ml_vchan_left_order(const ml_vchan *v);
int ml_vchan_right_order(const ml_vchan *v);
void *ml_vchan_ctrl_page(ml_vchan *v);
