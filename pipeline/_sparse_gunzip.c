/* Sparse gunzip: inflate a gzip file into a buffer that is all zero on entry, writing only the
 * bytes that are not zero.
 *
 * Why: a structure mask of a chest CT inflates to ~12 MB of which a few percent are not zero, and
 * deflate encodes the zero runs as back-references (mostly "repeat the previous byte 258 times").
 * A normal inflater writes every one of those zeros, and the regions stage then reads them all
 * again to check the mask and find its extent. Here a back-reference whose source lies wholly after
 * the last non-zero byte written so far is known to copy zeros, so it only advances the output
 * position. The CRC-32 of a zero run is folded in with one multiplication mod the CRC polynomial
 * (zlib's crc32_combine algebra), so the gzip trailer is still verified in full.
 *
 * It returns where it wrote: the end of the non-zero bytes before `vox_offset` (the NIfTI header),
 * a flag per voxel row that holds a non-zero byte, the bounding box of the non-zero voxels and the
 * OR of all voxel bytes (a 0/1 mask has none above 1). So the caller never reads the mask to check
 * it or find its extent, and clear() zeroes only the flagged rows before the next file.
 *
 * Everything is bounds-checked: a truncated or corrupt stream is a status code, never a read or a
 * write outside the buffers. The deflate format is RFC 1951, gzip RFC 1952.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { ST_OK = 0, ST_TRUNCATED = 1, ST_CORRUPT = 2, ST_TOO_LONG = 3, ST_CRC = 4, ST_HEADER = 5 };

/* ---- CRC-32 (reflected, polynomial 0xEDB88320), slice-by-8 ---------------------------------- */
#define POLY 0xedb88320u
static uint32_t crc_table[8][256];
static uint32_t x2n_table[32];

static uint32_t multmodp(uint32_t a, uint32_t b) { /* a * b modulo the CRC polynomial */
    uint32_t m = (uint32_t)1 << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0) break;
        }
        m >>= 1;
        b = b & 1 ? (b >> 1) ^ POLY : b >> 1;
    }
    return p;
}

static uint32_t x8nmodp(uint64_t n) { /* x^(8 n) modulo the polynomial */
    uint32_t p = (uint32_t)1 << 31;
    unsigned k = 3;
    while (n) {
        if (n & 1) p = multmodp(x2n_table[k & 31], p);
        n >>= 1;
        k++;
    }
    return p;
}

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ POLY : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
    uint32_t p = (uint32_t)1 << 30; /* x^1 */
    x2n_table[0] = p;
    for (int n = 1; n < 32; n++) x2n_table[n] = p = multmodp(p, p);
}

/* the register (pre-inversion) after `n` more bytes `p` */
static uint32_t crc_bytes(uint32_t r, const uint8_t *p, size_t n) {
    while (n && ((uintptr_t)p & 7)) { r = (r >> 8) ^ crc_table[0][(r ^ *p++) & 0xff]; n--; }
    while (n >= 8) {
        uint32_t lo = r ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        uint32_t hi = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;
        r = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^ crc_table[5][(lo >> 16) & 0xff] ^
            crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xff] ^ crc_table[2][(hi >> 8) & 0xff] ^
            crc_table[1][(hi >> 16) & 0xff] ^ crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) r = (r >> 8) ^ crc_table[0][(r ^ *p++) & 0xff];
    return r;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_CLMUL_PATH 1
/* CRC-32 by carry-less multiplication folding (Gopal et al., Intel 2009, "Fast CRC computation for
 * generic polynomials using PCLMULQDQ"); n >= 64 and a multiple of 16; takes and returns the register. */
__attribute__((target("pclmul,sse4.1"))) static uint32_t crc_clmul(uint32_t r, const uint8_t *p, size_t n) {
    const __m128i k1k2 = _mm_set_epi64x(0x01c6e41596LL, 0x0154442bd4LL);
    const __m128i k3k4 = _mm_set_epi64x(0x00ccaa009eLL, 0x01751997d0LL);
    const __m128i k5k0 = _mm_set_epi64x(0, 0x0163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x01f7011641LL, 0x01db710641LL);
    __m128i x1 = _mm_loadu_si128((const __m128i *)(p + 0)), x2 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 32)), x4 = _mm_loadu_si128((const __m128i *)(p + 48));
    __m128i x0, x5;
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)r));
    p += 64;
    n -= 64;
    while (n >= 64) {
        __m128i a = _mm_clmulepi64_si128(x1, k1k2, 0x00), b = _mm_clmulepi64_si128(x2, k1k2, 0x00);
        __m128i c = _mm_clmulepi64_si128(x3, k1k2, 0x00), d = _mm_clmulepi64_si128(x4, k1k2, 0x00);
        x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, k1k2, 0x11), a), _mm_loadu_si128((const __m128i *)(p + 0)));
        x2 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x2, k1k2, 0x11), b), _mm_loadu_si128((const __m128i *)(p + 16)));
        x3 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x3, k1k2, 0x11), c), _mm_loadu_si128((const __m128i *)(p + 32)));
        x4 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x4, k1k2, 0x11), d), _mm_loadu_si128((const __m128i *)(p + 48)));
        p += 64;
        n -= 64;
    }
    x0 = k3k4;
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, x0, 0x11), x2), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, x0, 0x11), x3), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, x0, 0x11), x4), x5);
    while (n >= 16) {
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, x0, 0x11), _mm_loadu_si128((const __m128i *)p)), x5);
        p += 16;
        n -= 16;
    }
    /* 128 -> 64 bits, then Barrett reduction to 32 */
    __m128i x2b = _mm_clmulepi64_si128(x1, x0, 0x10);
    const __m128i mask32 = _mm_setr_epi32(~0, 0, ~0, 0);
    x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), x2b);
    x2b = _mm_srli_si128(x1, 4);
    x1 = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(x1, mask32), k5k0, 0x00), x2b);
    x2b = _mm_clmulepi64_si128(_mm_and_si128(x1, mask32), poly, 0x10);
    x2b = _mm_clmulepi64_si128(_mm_and_si128(x2b, mask32), poly, 0x00);
    x1 = _mm_xor_si128(x1, x2b);
    return (uint32_t)_mm_extract_epi32(x1, 1);
}
static int use_clmul;
#endif

static void detect_cpu(void) {
#ifdef HAVE_CLMUL_PATH
    __builtin_cpu_init();
    use_clmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
#endif
}

/* the register after `n` more bytes `p`, the fastest way this CPU has */
static uint32_t crc_update(uint32_t r, const uint8_t *p, size_t n) {
#ifdef HAVE_CLMUL_PATH
    if (use_clmul && n >= 64) {
        size_t m = n & ~(size_t)15;
        r = crc_clmul(r, p, m);
        p += m;
        n -= m;
    }
#endif
    return crc_bytes(r, p, n);
}

/* the register after `n` zero bytes */
static uint32_t crc_zeros(uint32_t r, uint64_t n) {
    if (n >= 2048) return multmodp(x8nmodp(n), r); /* ~20 multiplications: cheaper than 2 KiB of table steps */
    for (; n >= 8; n -= 8)
        r = crc_table[7][r & 0xff] ^ crc_table[6][(r >> 8) & 0xff] ^ crc_table[5][(r >> 16) & 0xff] ^
            crc_table[4][r >> 24];
    while (n--) r = (r >> 8) ^ crc_table[0][r & 0xff];
    return r;
}

/* ---- bit input ------------------------------------------------------------------------------ */
typedef struct {
    const uint8_t *in, *end;
    uint64_t buf;
    unsigned cnt;
    unsigned padded; /* zero bytes appended past the end of the input (a truncated stream reads them) */
} Bits;

static inline void refill(Bits *b) {
    if (b->end - b->in >= 8) {
        const uint8_t *p = b->in;
        uint64_t w = (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24 |
                     (uint64_t)p[4] << 32 | (uint64_t)p[5] << 40 | (uint64_t)p[6] << 48 | (uint64_t)p[7] << 56;
        b->buf |= w << b->cnt;
        b->in += (63 - b->cnt) >> 3;
        b->cnt |= 56;
        return;
    }
    while (b->cnt <= 56) {
        uint64_t byte = 0;
        if (b->in < b->end) byte = *b->in++;
        else b->padded++;
        b->buf |= byte << b->cnt;
        b->cnt += 8;
    }
}

static inline uint32_t take(Bits *b, unsigned n) { /* n <= 32, after a refill that covers them */
    uint32_t v = (uint32_t)(b->buf & (((uint64_t)1 << n) - 1));
    b->buf >>= n;
    b->cnt -= n;
    return v;
}

/* ---- Huffman tables: one level, indexed by the next `bits` input bits ------------------------ */
/* entry = symbol << 8 | code length; 0 = no code (an incomplete code's hole, or corrupt input) */
typedef struct {
    uint32_t t[1 << 15];
    unsigned bits;
} Table;

static int build(Table *tab, const uint8_t *lens, int n) {
    unsigned count[16] = {0}, next[16];
    unsigned maxlen = 0;
    for (int s = 0; s < n; s++) {
        count[lens[s]]++;
        if (lens[s] > maxlen) maxlen = lens[s];
    }
    int left = 1;
    for (int l = 1; l < 16; l++) {
        left = (left << 1) - (int)count[l];
        if (left < 0) return -1; /* over-subscribed */
    }
    if (maxlen == 0) maxlen = 1; /* no codes at all: every lookup is a hole */
    tab->bits = maxlen;
    memset(tab->t, 0, sizeof(uint32_t) << maxlen);
    unsigned code = 0;
    count[0] = 0;
    for (int l = 1; l < 16; l++) {
        code = (code + count[l - 1]) << 1;
        next[l] = code;
    }
    for (int s = 0; s < n; s++) {
        unsigned l = lens[s];
        if (!l) continue;
        unsigned c = next[l]++, r = 0;
        for (unsigned i = 0; i < l; i++) r |= ((c >> i) & 1) << (l - 1 - i); /* codes are MSB-first */
        uint32_t e = (uint32_t)s << 8 | l;
        for (unsigned i = r; i < (1u << maxlen); i += 1u << l) tab->t[i] = e;
    }
    return 0;
}

static const uint16_t LEN_BASE[29] = {3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31,
                                      35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
static const uint8_t LEN_EXTRA[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2,
                                      2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
static const uint16_t DIST_BASE[30] = {1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129,
                                       193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097,
                                       6145, 8193, 12289, 16385, 24577};
static const uint8_t DIST_EXTRA[30] = {0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6,
                                       6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};
static const uint8_t CL_ORDER[19] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};

/* ---- output state --------------------------------------------------------------------------- */
typedef struct {
    uint8_t *out;
    size_t cap, pos, vox;      /* buffer size, bytes produced, where the voxels start */
    size_t start;              /* where this gzip member's output starts (its window's floor) */
    size_t nx, ny, nrows;      /* voxel bytes per row, rows per slice, rows in all */
    uint8_t *dirty;            /* one flag per row: it holds a non-zero byte */
    size_t last_end;           /* 1 + the last non-zero byte written (0: none) */
    size_t head_end;           /* 1 + the last non-zero byte written before `vox` */
    size_t z0, z1, y0, y1, x0, x1; /* bounding box of the non-zero voxels (z0 = SIZE_MAX: none) */
    unsigned vox_or;           /* OR of every voxel byte: a 0/1 mask has no bit above the first */
    /* The CRC register covers the output before `crc_pos`; then come `zeros` skipped zero bytes, then
     * the bytes really in the buffer from crc_pos + zeros to pos: CRC-ed in one call when a zero run
     * is skipped after them, so long stretches of written rows go through the fast CRC in bulk. */
    size_t crc_pos;
    uint64_t zeros;
    size_t tail;               /* short zero runs kept in the segment (the buffer holds them as zeros) */
    uint32_t crc;
    size_t row, row_start, z, y; /* the row last noted, where it starts (voxel offset), its slice and y */
} Out;

static void crc_flush(Out *o) {
    if (o->zeros) o->crc = crc_zeros(o->crc, o->zeros);
    size_t real = o->crc_pos + o->zeros;
    if (o->pos > real) o->crc = crc_update(o->crc, o->out + real, o->pos - real);
    o->crc_pos = o->pos;
    o->zeros = 0;
    o->tail = 0;
}

#define SHORT_ZEROS 512 /* a zero run this short inside written rows is cheaper to CRC than to fold */

static inline void skip_zeros(Out *o, size_t len) { /* `len` zero bytes at pos, not written */
    size_t real = o->crc_pos + o->zeros;
    if (o->pos == real) { /* no written bytes pending: the run joins the skipped zeros */
        o->zeros += len;
    } else if (o->tail + len <= SHORT_ZEROS) {
        o->tail += len;
    } else { /* CRC the written bytes before the tail; the tail and this run become skipped zeros */
        if (o->zeros) o->crc = crc_zeros(o->crc, o->zeros);
        o->crc = crc_update(o->crc, o->out + real, o->pos - o->tail - real);
        o->crc_pos = o->pos - o->tail;
        o->zeros = o->tail + len;
        o->tail = 0;
    }
    o->pos += len;
}

/* first and last non-zero byte of p[0, n) (-> 0 when none) and the OR of all bytes */
static inline int scan(const uint8_t *p, size_t n, size_t *first, size_t *last, unsigned *acc) {
    size_t i = 0, f = SIZE_MAX, l = 0;
    uint64_t or64 = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        if (w) {
            or64 |= w;
            if (f == SIZE_MAX) f = i;
            l = i + 8;
        }
    }
    for (; i < n; i++)
        if (p[i]) {
            or64 |= p[i];
            if (f == SIZE_MAX) f = i;
            l = i + 1;
        }
    if (f == SIZE_MAX) return 0;
    while (!p[f]) f++; /* to the byte, inside the first and last non-zero words */
    while (!p[l - 1]) l--;
    or64 |= or64 >> 32;
    or64 |= or64 >> 16;
    or64 |= or64 >> 8;
    *first = f;
    *last = l - 1;
    *acc = (unsigned)(or64 & 0xff);
    return 1;
}

/* make o->row the row that holds voxel offset `off` (usually it is, or the next one: no division) */
static inline void locate(Out *o, size_t off) {
    if (off >= o->row_start && off - o->row_start < o->nx) return;
    if (off >= o->row_start + o->nx && off - o->row_start < 2 * o->nx) {
        o->row++;
        o->row_start += o->nx;
        if (++o->y == o->ny) {
            o->y = 0;
            o->z++;
        }
        return;
    }
    o->row = off / o->nx;
    o->row_start = o->row * o->nx;
    o->z = o->row / o->ny;
    o->y = o->row - o->z * o->ny;
}

/* columns [cf, cl] of the current row hold non-zero bytes whose OR is `acc` */
static inline void mark(Out *o, size_t cf, size_t cl, unsigned acc) {
    o->vox_or |= acc;
    o->dirty[o->row] = 1;
    if (o->z0 == SIZE_MAX) o->z0 = o->z;
    o->z1 = o->z + 1; /* rows come in order */
    if (o->y < o->y0) o->y0 = o->y;
    if (o->y + 1 > o->y1) o->y1 = o->y + 1;
    if (cf < o->x0) o->x0 = cf;
    if (cl + 1 > o->x1) o->x1 = cl + 1;
}

/* voxel bytes [a, b) (absolute positions, a >= vox) may hold non-zero bytes: mark them row by row */
static void note_voxels(Out *o, size_t a, size_t b) {
    size_t off = a - o->vox, end = b - o->vox;
    if (end > o->nrows * o->nx) end = o->nrows * o->nx; /* cannot happen: cap = vox + voxels */
    const uint8_t *v = o->out + o->vox;
    while (off < end) {
        locate(o, off);
        size_t seg_end = end < o->row_start + o->nx ? end : o->row_start + o->nx;
        size_t f, l;
        unsigned acc;
        if (scan(v + off, seg_end - off, &f, &l, &acc)) mark(o, off - o->row_start + f, off - o->row_start + l, acc);
        off = seg_end;
    }
}

/* bytes [a, b) were really written: note where the non-zero ones are */
static void note_written(Out *o, size_t a, size_t b) {
    size_t f, l;
    unsigned acc;
    if (!scan(o->out + a, b - a, &f, &l, &acc)) return;
    if (a + l + 1 > o->last_end) o->last_end = a + l + 1;
    if (a < o->vox) { /* touches the header: the slow way */
        size_t h = a + l + 1 < o->vox ? a + l + 1 : o->vox;
        while (h > a && !o->out[h - 1]) h--;
        if (h > o->head_end) o->head_end = h;
        if (a + l + 1 > o->vox) note_voxels(o, a + f > o->vox ? a + f : o->vox, a + l + 1);
        return;
    }
    size_t of = a + f - o->vox, ol = a + l - o->vox;
    if (ol >= o->nrows * o->nx) return; /* cannot happen: cap = vox + voxels */
    locate(o, of);
    if (ol < o->row_start + o->nx) mark(o, of - o->row_start, ol - o->row_start, acc); /* one row: scanned once */
    else note_voxels(o, a + f, a + l + 1);
}

static inline int put_literal(Out *o, unsigned c) {
    if (o->pos >= o->cap) return ST_TOO_LONG;
    if (!c) {
        skip_zeros(o, 1); /* a zero literal is in the buffer already */
        return ST_OK;
    }
    o->out[o->pos] = (uint8_t)c;
    o->last_end = o->pos + 1;
    if (o->pos < o->vox) o->head_end = o->pos + 1;
    else {
        size_t off = o->pos - o->vox;
        if (off < o->nrows * o->nx) {
            locate(o, off);
            mark(o, off - o->row_start, off - o->row_start, c);
        }
    }
    o->pos++;
    o->tail = 0;
    return ST_OK;
}

static inline int put_match(Out *o, size_t len, size_t dist) {
    if (dist > o->pos - o->start) return ST_CORRUPT; /* reaches before the start of the member's output */
    if (len > o->cap - o->pos) return ST_TOO_LONG;
    size_t src = o->pos - dist;
    if (src >= o->last_end) { /* everything from `src` on is still zero: a zero run */
        skip_zeros(o, len);
        return ST_OK;
    }
    uint8_t *d = o->out + o->pos;
    const uint8_t *s = o->out + src;
    if (dist >= len) memcpy(d, s, len);
    else for (size_t i = 0; i < len; i++) d[i] = s[i]; /* overlapping: repeats the last `dist` bytes */
    note_written(o, o->pos, o->pos + len);
    o->pos += len;
    o->tail = 0;
    return ST_OK;
}

/* ---- one deflate stream --------------------------------------------------------------------- */
typedef struct {
    Table lit, dist, cl;
} Tables;

static int fixed_tables(Tables *T) {
    uint8_t lens[320];
    int i = 0;
    for (; i < 144; i++) lens[i] = 8;
    for (; i < 256; i++) lens[i] = 9;
    for (; i < 280; i++) lens[i] = 7;
    for (; i < 288; i++) lens[i] = 8;
    for (i = 0; i < 30; i++) lens[288 + i] = 5;
    if (build(&T->lit, lens, 288) || build(&T->dist, lens + 288, 30)) return ST_CORRUPT;
    return ST_OK;
}

static inline int decode(Bits *b, const Table *t, unsigned *sym) {
    uint32_t e = t->t[b->buf & ((1u << t->bits) - 1)];
    unsigned l = e & 0xff;
    if (!l || l > b->cnt) return ST_CORRUPT;
    b->buf >>= l;
    b->cnt -= l;
    *sym = e >> 8;
    return ST_OK;
}

static int dynamic_tables(Bits *b, Tables *T) {
    refill(b);
    unsigned nlit = take(b, 5) + 257, ndist = take(b, 5) + 1, ncl = take(b, 4) + 4;
    if (nlit > 286 || ndist > 30) return ST_CORRUPT;
    uint8_t cl[19] = {0};
    for (unsigned i = 0; i < ncl; i++) {
        refill(b);
        cl[CL_ORDER[i]] = (uint8_t)take(b, 3);
    }
    if (build(&T->cl, cl, 19)) return ST_CORRUPT;
    uint8_t lens[320];
    unsigned n = 0;
    while (n < nlit + ndist) {
        refill(b);
        if (b->padded > 8) return ST_TRUNCATED;
        unsigned sym;
        if (decode(b, &T->cl, &sym)) return ST_CORRUPT;
        if (sym < 16) {
            lens[n++] = (uint8_t)sym;
            continue;
        }
        unsigned rep, val = 0;
        if (sym == 16) {
            if (n == 0) return ST_CORRUPT;
            val = lens[n - 1];
            rep = 3 + take(b, 2);
        } else if (sym == 17) {
            rep = 3 + take(b, 3);
        } else {
            rep = 11 + take(b, 7);
        }
        if (n + rep > nlit + ndist) return ST_CORRUPT;
        while (rep--) lens[n++] = (uint8_t)val;
    }
    if (lens[256] == 0) return ST_CORRUPT; /* no end-of-block code */
    if (build(&T->lit, lens, (int)nlit) || build(&T->dist, lens + nlit, (int)ndist)) return ST_CORRUPT;
    return ST_OK;
}

/* the bit-reversed code and length of `sym` in `t` (0: it has none) */
static unsigned code_of(const Table *t, unsigned sym, uint32_t *rev) {
    for (uint32_t i = 0; i < (1u << t->bits); i++) {
        uint32_t e = t->t[i];
        if ((e & 0xff) && (e >> 8) == sym && i < (1u << (e & 0xff))) {
            *rev = i;
            return e & 0xff;
        }
    }
    return 0;
}

/* A mask's long zero runs are coded as one pair repeated: length 258 (symbol 285), distance 1
 * (distance symbol 0), neither with extra bits. `pattern` is that pair's bits `reps` times over, so
 * one compare recognises `reps` runs at once. reps = 0: the block has no such pair. */
typedef struct {
    uint64_t pattern, mask;
    unsigned bits, reps;
} ZeroRuns;

static ZeroRuns zero_runs(const Tables *T) {
    ZeroRuns z = {0, 0, 0, 0};
    uint32_t r1, r2;
    unsigned l1 = code_of(&T->lit, 285, &r1), l2 = l1 ? code_of(&T->dist, 0, &r2) : 0;
    if (!l1 || !l2) return z;
    uint64_t unit = (uint64_t)r1 | (uint64_t)r2 << l1;
    unsigned u = l1 + l2;
    z.reps = 48 / u;
    z.bits = z.reps * u;
    for (unsigned i = 0; i < z.reps; i++) z.pattern |= unit << (i * u);
    z.mask = ((uint64_t)1 << z.bits) - 1;
    return z;
}

static int inflate_blocks(Bits *b, Out *o, Tables *T) {
    int last = 0;
    while (!last) {
        refill(b);
        if (b->padded > 8) return ST_TRUNCATED;
        last = (int)take(b, 1);
        unsigned type = take(b, 2);
        if (type == 0) { /* stored: byte-aligned LEN, NLEN, then LEN bytes */
            take(b, b->cnt & 7);
            refill(b);
            unsigned len = take(b, 16), nlen = take(b, 16);
            if (b->padded * 8 > b->cnt) return ST_TRUNCATED;
            if ((len ^ 0xffff) != nlen) return ST_CORRUPT;
            b->in -= b->cnt / 8 - b->padded; /* give back the whole bytes still in the bit buffer */
            b->buf = 0;
            b->cnt = 0;
            b->padded = 0;
            if ((size_t)(b->end - b->in) < len) return ST_TRUNCATED;
            if (len > o->cap - o->pos) return ST_TOO_LONG;
            memcpy(o->out + o->pos, b->in, len);
            note_written(o, o->pos, o->pos + len);
            o->pos += len;
            o->tail = 0;
            b->in += len;
            continue;
        }
        int st = type == 1 ? fixed_tables(T) : type == 2 ? dynamic_tables(b, T) : ST_CORRUPT;
        if (st) return st;
        const ZeroRuns z = zero_runs(T);
        const size_t run = (size_t)z.reps * 258;
        for (;;) {
            refill(b);
            if (b->padded > 8) return ST_TRUNCATED;
            if (z.reps && o->pos > o->start && o->pos - 1 >= o->last_end) { /* in a zero run */
                while ((b->buf & z.mask) == z.pattern && o->cap - o->pos >= run) {
                    b->buf >>= z.bits;
                    b->cnt -= z.bits;
                    skip_zeros(o, run);
                    refill(b);
                    if (b->padded > 8) return ST_TRUNCATED;
                }
            }
            unsigned sym;
            if (decode(b, &T->lit, &sym)) return ST_CORRUPT;
            if (sym < 256) {
                if ((st = put_literal(o, sym))) return st;
                continue;
            }
            if (sym == 256) break;
            sym -= 257;
            if (sym >= 29) return ST_CORRUPT;
            size_t len = LEN_BASE[sym] + take(b, LEN_EXTRA[sym]);
            unsigned dsym;
            if (decode(b, &T->dist, &dsym) || dsym >= 30) return ST_CORRUPT;
            size_t dist = DIST_BASE[dsym] + take(b, DIST_EXTRA[dsym]);
            if ((st = put_match(o, len, dist))) return st;
        }
    }
    return ST_OK;
}

/* ---- gzip members --------------------------------------------------------------------------- */
static int gunzip(const uint8_t *in, size_t n, Out *o, Tables *T) {
    size_t at = 0;
    while (at < n) {
        const uint8_t *p = in + at;
        size_t left = n - at;
        if (at) { /* zero padding after the last member is allowed (as libdeflate's caller allows it) */
            size_t k = 0;
            while (k < left && !p[k]) k++;
            if (k == left) break;
        }
        if (left < 18) return ST_TRUNCATED;
        if (p[0] != 0x1f || p[1] != 0x8b || p[2] != 8 || (p[3] & 0xe0)) return ST_HEADER;
        unsigned flg = p[3];
        size_t h = 10;
        if (flg & 4) { /* FEXTRA */
            if (left < h + 2) return ST_TRUNCATED;
            h += 2 + ((size_t)p[h] | (size_t)p[h + 1] << 8);
        }
        if (flg & 8) { /* FNAME */
            while (h < left && p[h]) h++;
            h++;
        }
        if (flg & 16) { /* FCOMMENT */
            while (h < left && p[h]) h++;
            h++;
        }
        if (flg & 2) h += 2; /* FHCRC */
        if (h + 8 > left) return ST_TRUNCATED;
        Bits b = {p + h, in + n, 0, 0, 0};
        size_t start = o->pos;
        o->start = start;
        o->crc = 0xffffffffu;
        o->crc_pos = start;
        o->zeros = 0;
        o->tail = 0;
        int st = inflate_blocks(&b, o, T);
        if (st) return st;
        crc_flush(o);
        take(&b, b.cnt & 7); /* to a byte boundary */
        if (b.padded * 8 > b.cnt) return ST_TRUNCATED;
        const uint8_t *trailer = b.in - (b.cnt / 8 - b.padded);
        if ((size_t)(in + n - trailer) < 8) return ST_TRUNCATED;
        uint32_t crc = (uint32_t)trailer[0] | (uint32_t)trailer[1] << 8 | (uint32_t)trailer[2] << 16 |
                       (uint32_t)trailer[3] << 24;
        uint32_t isize = (uint32_t)trailer[4] | (uint32_t)trailer[5] << 8 | (uint32_t)trailer[6] << 16 |
                         (uint32_t)trailer[7] << 24;
        if (crc != ~o->crc || isize != (uint32_t)(o->pos - start)) return ST_CRC;
        at = (size_t)(trailer + 8 - in);
    }
    return ST_OK;
}

/* ---- Python binding ------------------------------------------------------------------------- */
static int row_args(Py_buffer *out, Py_ssize_t vox, Py_ssize_t nx, Py_ssize_t ny, Py_buffer *dirty) {
    if (vox < 0 || nx <= 0 || ny <= 0 || vox > out->len || (out->len - vox) % nx ||
        (out->len - vox) / nx != dirty->len || dirty->len % ny) {
        PyErr_SetString(PyExc_ValueError, "gunzip: `out` must be vox_offset + rows * nx bytes, `dirty` one byte "
                                          "per row, rows a multiple of ny");
        return -1;
    }
    return 0;
}

static PyObject *py_gunzip(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer data, out, dirty;
    Py_ssize_t vox, nx, ny;
    if (!PyArg_ParseTuple(args, "y*w*nnnw*", &data, &out, &vox, &nx, &ny, &dirty)) return NULL;
    PyObject *result = NULL;
    Tables *T = NULL;
    if (row_args(&out, vox, nx, ny, &dirty)) goto done;
    T = PyMem_RawMalloc(sizeof(Tables));
    if (!T) {
        PyErr_NoMemory();
        goto done;
    }
    Out o;
    memset(&o, 0, sizeof o);
    o.out = (uint8_t *)out.buf;
    o.cap = (size_t)out.len;
    o.vox = (size_t)vox;
    o.nx = (size_t)nx;
    o.ny = (size_t)ny;
    o.nrows = (size_t)dirty.len;
    o.dirty = (uint8_t *)dirty.buf;
    o.z0 = o.y0 = o.x0 = SIZE_MAX;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = gunzip((const uint8_t *)data.buf, (size_t)data.len, &o, T);
    Py_END_ALLOW_THREADS
    if (o.z0 == SIZE_MAX)
        result = Py_BuildValue("innI(nnnnnn)", st, (Py_ssize_t)o.pos, (Py_ssize_t)o.head_end, o.vox_or,
                               (Py_ssize_t)0, (Py_ssize_t)0, (Py_ssize_t)0, (Py_ssize_t)0, (Py_ssize_t)0, (Py_ssize_t)0);
    else
        result = Py_BuildValue("innI(nnnnnn)", st, (Py_ssize_t)o.pos, (Py_ssize_t)o.head_end, o.vox_or,
                               (Py_ssize_t)o.z0, (Py_ssize_t)o.z1, (Py_ssize_t)o.y0, (Py_ssize_t)o.y1,
                               (Py_ssize_t)o.x0, (Py_ssize_t)o.x1);
done:
    PyMem_RawFree(T);
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    PyBuffer_Release(&dirty);
    return result;
}

static PyObject *py_clear(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer out, dirty;
    Py_ssize_t vox, nx, ny, head_end;
    if (!PyArg_ParseTuple(args, "w*nnnw*n", &out, &vox, &nx, &ny, &dirty, &head_end)) return NULL;
    PyObject *result = NULL;
    if (row_args(&out, vox, nx, ny, &dirty)) goto done;
    if (head_end < 0 || head_end > vox) {
        PyErr_SetString(PyExc_ValueError, "clear: head_end must lie in [0, vox_offset]");
        goto done;
    }
    uint8_t *o = (uint8_t *)out.buf, *d = (uint8_t *)dirty.buf;
    Py_BEGIN_ALLOW_THREADS
    memset(o, 0, (size_t)head_end);
    for (Py_ssize_t r = 0; r < dirty.len; r++)
        if (d[r]) {
            memset(o + vox + r * nx, 0, (size_t)nx);
            d[r] = 0;
        }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&dirty);
    return result;
}

static PyMethodDef METHODS[] = {
    {"gunzip", py_gunzip, METH_VARARGS,
     "gunzip(data, out, vox_offset, nx, ny, dirty) -> (status, produced, head_end, voxel_or, box)\n\n"
     "Inflate the gzip file `data` into `out` (vox_offset header bytes, then rows of nx voxel bytes, ny rows\n"
     "per slice), which must be all zero: only non-zero bytes are written. `dirty` (one zeroed byte per row)\n"
     "gets a 1 for every row that holds a non-zero byte.\n"
     "status: 0 ok, 1 truncated, 2 corrupt, 3 longer than `out`, 4 CRC or size mismatch, 5 not gzip.\n"
     "head_end: header bytes [0, head_end) may be non-zero. voxel_or: OR of all voxel bytes (<= 1 for a\n"
     "0/1 mask). box: (z0, z1, y0, y1, x0, x1) of the non-zero voxels, all 0 when there are none.\n"
     "Call clear() with the same buffers before the next gunzip, also after an error."},
    {"clear", py_clear, METH_VARARGS,
     "clear(out, vox_offset, nx, ny, dirty, head_end): zero the header bytes and the flagged rows again."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_sparse_gunzip",
                                    "Inflate gzip files into an all-zero buffer, writing only non-zero bytes.",
                                    -1, METHODS};

PyMODINIT_FUNC PyInit__sparse_gunzip(void) {
    crc_init();
    detect_cpu();
    return PyModule_Create(&MODULE);
}
