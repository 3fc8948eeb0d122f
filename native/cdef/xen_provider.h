/* Declarations of native/xen_provider.h exported to Python (cffi cdef). */
const char *ml_xen_error(void);
int ml_xen_probe(void);
int ml_xen_server_new(uint32_t peer_domid, const char *xs_path, size_t read_min,
                      size_t write_min, ml_vchan **out);
int ml_xen_client_new(uint32_t server_domid, const char *xs_path, ml_vchan **out);
int ml_xen_event_fd(const ml_vchan *v);
int ml_xen_event_ack(ml_vchan *v);
int ml_xen_own_domid(uint32_t *out);

typedef struct ml_xs ml_xs;
ml_xs *ml_xs_open(void);
void ml_xs_close(ml_xs *h);
uint32_t ml_xs_transaction_start(ml_xs *h);
int ml_xs_transaction_end(ml_xs *h, uint32_t t, int abort);
long ml_xs_read(ml_xs *h, uint32_t t, const char *path, char *buf, size_t cap);
int ml_xs_write(ml_xs *h, uint32_t t, const char *path, const char *data, size_t len);
int ml_xs_rm(ml_xs *h, uint32_t t, const char *path);
int ml_xs_set_permissions(ml_xs *h, uint32_t t, const char *path, const uint32_t *ids,
                          const uint32_t *perms, unsigned n);
long ml_xs_directory(ml_xs *h, uint32_t t, const char *path, char *buf, size_t cap);
