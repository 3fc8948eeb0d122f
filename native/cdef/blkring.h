/* Declarations of native/blkring.h exported to Python (cffi cdef syntax). */
#define ML_BLK_SECTOR_SIZE 512
#define ML_BLK_MAX_SEGMENTS 11
#define ML_BLK_OP_READ 0
#define ML_BLK_OP_WRITE 1
#define ML_BLK_OP_WRITE_BARRIER 2
#define ML_BLK_OP_FLUSH_DISKCACHE 3
#define ML_BLK_OP_DISCARD 5
#define ML_BLK_OP_INDIRECT 6
#define ML_BLK_RSP_OKAY 0
#define ML_BLK_RSP_ERROR -1
#define ML_BLK_RSP_EOPNOTSUPP -2

struct ml_blk_segment { uint32_t gref; uint8_t first_sect; uint8_t last_sect; uint8_t pad[2]; };
struct ml_blk_request {
    uint8_t operation; uint8_t nr_segments; uint16_t handle; uint32_t pad;
    uint64_t id; uint64_t sector_number; struct ml_blk_segment seg[11];
};
struct ml_blk_request_discard {
    uint8_t operation; uint8_t flag; uint16_t handle; uint32_t pad;
    uint64_t id; uint64_t sector_number; uint64_t nr_sectors;
};
#define ML_BLK_MAX_INDIRECT_SEGMENTS 256
struct ml_blk_request_indirect {
    uint8_t operation; uint8_t indirect_op; uint16_t nr_segments; uint32_t pad;
    uint64_t id; uint64_t sector_number; uint16_t handle; uint16_t pad2;
    uint32_t indirect_grefs[8]; uint32_t pad3;
};
struct ml_blk_response { uint64_t id; uint8_t operation; uint8_t pad; int16_t status; uint32_t pad2; };
struct ml_blk_checked {
    struct ml_blk_request req; int16_t status; uint8_t op; uint64_t nr_sectors; uint64_t offset;
    uint64_t length; uint32_t nsegs; struct ml_blk_segment segs[256];
};
typedef struct ml_blk_front ml_blk_front;
typedef struct ml_blk_back ml_blk_back;

size_t ml_blk_request_size(void);
size_t ml_blk_response_size(void);
size_t ml_blk_sring_header_size(void);
size_t ml_blk_field_offset(int field);
unsigned ml_blk_ring_entries(int order);

int ml_blk_front_new(void *ring, int order, ml_blk_front **out);
void ml_blk_front_free(ml_blk_front *f);
unsigned ml_blk_front_free_slots(const ml_blk_front *f);
int ml_blk_front_put(ml_blk_front *f, const struct ml_blk_request *req);
int ml_blk_front_push(ml_blk_front *f);
int ml_blk_front_get(ml_blk_front *f, struct ml_blk_response *out);
int ml_blk_front_final_check(ml_blk_front *f);

int ml_blk_back_new(void *ring, int order, uint8_t *pages, uint32_t gref_base,
                    uint32_t npages, uint64_t disk_sectors, int read_only, ml_blk_back **out);
void ml_blk_back_free(ml_blk_back *b);
int ml_blk_back_get(ml_blk_back *b, struct ml_blk_checked *out);
uint8_t *ml_blk_back_segment(ml_blk_back *b, const struct ml_blk_checked *c, int i, uint32_t *len);
void ml_blk_back_gather(ml_blk_back *b, const struct ml_blk_checked *c, uint8_t *dst);
void ml_blk_back_scatter(ml_blk_back *b, const struct ml_blk_checked *c, const uint8_t *src);
int ml_blk_back_put(ml_blk_back *b, uint64_t id, uint8_t op, int16_t status);
int ml_blk_back_push(ml_blk_back *b);
int ml_blk_back_final_check(ml_blk_back *b);
long ml_blk_back_serve_buffer(ml_blk_back *b, uint8_t *disk, int *notify);
