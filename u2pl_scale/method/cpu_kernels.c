/* Fused CPU kernels of the U2PL method's memory-bound passes (u2pl_scale/method/native.py builds and loads this
 * file with the system C compiler and ctypes; without a compiler the method runs the same maths as torch ops).
 *
 * Each kernel reads its large input once and keeps a pixel row (or an anchor's negatives) in cache for the
 * passes over it, where the torch-op forms stream the same hundreds of MB several times per step:
 *   u2pl_entropy     per-pixel entropy of softmax(logits)                     [B, C, H, W] -> [B, H, W]
 *   u2pl_ce_grad     sum of CE over valid pixels, and in the same pass the gradient scale * (softmax - onehot)
 *   u2pl_anchor_neg  for each anchor row: dot products with its sampled queue rows, the log-softmax with the
 *                    prototype logit, and sum_k p_k row_k (the anchor's gradient from its negatives)
 *   u2pl_prepare_rows  the teacher rows normalised for the queues, and their per-class (prototype) sums
 *   u2pl_push        each kept row straight into its class's ring slot, with streaming stores
 *   u2pl_negative_mask  the negatives' class mask from each pixel's class ranks, class-major
 * exp and log are polynomial approximations written so that the compiler vectorises the loops over pixels
 * (relative error about 2e-7 for exp, 1e-7 for log over the ranges used); the rest is plain fp32 arithmetic with
 * fp64 loss and prototype sums. Work is split over pthreads by rows (by classes for the push); every kernel returns
 * 0, -1 for bad input (an index or label out of range) or -2 when a worker could not get its scratch memory,
 * having written nothing past its outputs' bounds.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#define MAX_THREADS 256
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 8  /* rows ahead; 2 to 16 timed alike (45-55 ms for the VOC negatives), none 71 ms */
#endif

/* exp(x) for x <= 0 .. 88 (Cephes expf): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6 polynomial, times
 * 2^n built from the exponent bits. Inputs below -87.3 give exp(-87.3) ~ 1e-38 instead of a smaller or zero value,
 * an absolute difference below 1.2e-38. Branch-free, so loops over it vectorise. */
static inline float u2pl_exp(float x) {
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.3f ? 88.3f : x;
    float fn = rintf(x * 1.44269504088896341f);
    int n = (int)fn;
    float r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale;
    scale.i = (n + 127) << 23;
    return p * scale.f;
}

/* log(x) for finite x > 0, normal (Cephes logf): x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) by a
 * polynomial in m - 1. Branch-free. */
static inline float u2pl_log(float x) {
    union { float f; int32_t i; } bits;
    bits.f = x;
    int e = ((bits.i >> 23) & 0xff) - 126;  /* x = m' 2^e with m' in [0.5, 1) */
    bits.i = (bits.i & 0x007fffff) | 0x3f000000;
    float m = bits.f;
    int small = m < 0.707106781186547524f;
    e -= small;
    m = small ? m + m - 1.0f : m - 1.0f;
    float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    float fe = (float)e;
    y += -2.12194440e-4f * fe;
    y += -0.5f * z;
    return m + y + 0.693359375f * fe;
}

/* ---- a minimal parallel for over [0, n) ---- */
typedef void (*range_fn)(void *ctx, int64_t begin, int64_t end, int worker);
typedef struct { range_fn fn; void *ctx; int64_t begin, end; int worker; } range_job;

static void *run_range(void *arg) {
    range_job *job = (range_job *)arg;
    job->fn(job->ctx, job->begin, job->end, job->worker);
    return NULL;
}

/* Splits [0, n) into `threads` contiguous parts, runs the first on the calling thread. Falls back to fewer threads
 * if one cannot be started (the caller sees no difference but speed). */
static void parallel_for(int64_t n, int threads, range_fn fn, void *ctx) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = n > 0 ? (int)n : 1;
    range_job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 0; t < threads; ++t) {
        jobs[t].fn = fn;
        jobs[t].ctx = ctx;
        jobs[t].begin = n * t / threads;
        jobs[t].end = n * (t + 1) / threads;
        jobs[t].worker = t;
        started[t] = 0;
    }
    for (int t = 1; t < threads; ++t)
        started[t] = pthread_create(&ids[t], NULL, run_range, &jobs[t]) == 0;
    run_range(&jobs[0]);
    for (int t = 1; t < threads; ++t) {
        if (started[t]) pthread_join(ids[t], NULL);
        else run_range(&jobs[t]);
    }
}

/* A kernel's result from its workers' flags: 0, -1 if one met bad input (BAD_INPUT), -2 if one could not get its
 * scratch memory (NO_MEMORY). */
#define BAD_INPUT 1
#define NO_MEMORY 2
static int status_of(const int *flags) {
    int status = 0;
    for (int t = 0; t < MAX_THREADS; ++t) {
        if (flags[t] == NO_MEMORY) return -2;
        if (flags[t] == BAD_INPUT) status = -1;
    }
    return status;
}

/* mx[x] = max over the C class planes (plane elements apart) of z[k * plane + x], for the W pixels of a row */
static inline void class_max(const float *z, int64_t C, int64_t plane, int64_t W, float *mx) {
    for (int64_t x = 0; x < W; ++x) mx[x] = z[x];
    for (int64_t k = 1; k < C; ++k) {
        const float *zk = z + k * plane;
        for (int64_t x = 0; x < W; ++x) mx[x] = zk[x] > mx[x] ? zk[x] : mx[x];
    }
}

/* ---- entropy ---- */
typedef struct { const float *logits; float *out; int *bad; int64_t classes, height, width; } entropy_ctx;

/* rows are (image, y) pairs; per row: max over classes, e = exp(z - max), S = sum e, H = log S - sum e (z - max) / S
 * (the same form as reliability.entropy_from_logits' CPU path) */
static void entropy_rows(void *arg, int64_t begin, int64_t end, int worker) {
    entropy_ctx *c = (entropy_ctx *)arg;
    const int64_t W = c->width, C = c->classes, plane = c->height * W;
    float *mx = malloc(sizeof(float) * 3 * W);
    if (!mx) { c->bad[worker] = NO_MEMORY; return; }
    float *total = mx + W, *weighted = mx + 2 * W;
    for (int64_t row = begin; row < end; ++row) {
        int64_t b = row / c->height, y = row % c->height;
        const float *z = c->logits + b * C * plane + y * W;
        class_max(z, C, plane, W, mx);
        memset(total, 0, sizeof(float) * W);
        memset(weighted, 0, sizeof(float) * W);
        for (int64_t k = 0; k < C; ++k) {
            const float *zk = z + k * plane;
            for (int64_t x = 0; x < W; ++x) {
                float d = zk[x] - mx[x];
                float e = u2pl_exp(d);
                total[x] += e;
                weighted[x] += e * d;
            }
        }
        float *o = c->out + b * plane + y * W;
        for (int64_t x = 0; x < W; ++x) o[x] = u2pl_log(total[x]) - weighted[x] / total[x];
    }
    free(mx);
}

int u2pl_entropy(const float *logits, float *out, int64_t batch, int64_t classes, int64_t height, int64_t width,
                 int threads) {
    int bad[MAX_THREADS] = {0};
    entropy_ctx c = {logits, out, bad, classes, height, width};
    parallel_for(batch * height, threads, entropy_rows, &c);
    return status_of(bad);
}

/* ---- cross-entropy and its gradient ---- */
typedef struct {
    const float *logits; const int64_t *target; float *grad; double *partial; int *bad;
    int64_t classes, height, width, ignore_index; float scale;
} ce_ctx;

static void ce_rows(void *arg, int64_t begin, int64_t end, int worker) {
    ce_ctx *c = (ce_ctx *)arg;
    const int64_t W = c->width, C = c->classes, plane = c->height * W;
    float *mx = malloc(sizeof(float) * 2 * W);
    double loss = 0.0;
    if (!mx) { c->bad[worker] = NO_MEMORY; return; }
    float *total = mx + W;
    for (int64_t row = begin; row < end; ++row) {
        int64_t b = row / c->height, y = row % c->height;
        const float *z = c->logits + b * C * plane + y * W;
        float *g = c->grad + b * C * plane + y * W;
        const int64_t *t = c->target + b * plane + y * W;
        for (int64_t x = 0; x < W; ++x) {
            if (t[x] != c->ignore_index && (t[x] < 0 || t[x] >= C)) { c->bad[worker] = BAD_INPUT; goto done; }
        }
        class_max(z, C, plane, W, mx);
        memset(total, 0, sizeof(float) * W);
        for (int64_t k = 0; k < C; ++k) {
            const float *zk = z + k * plane;
            float *gk = g + k * plane;
            for (int64_t x = 0; x < W; ++x) {
                float e = u2pl_exp(zk[x] - mx[x]);
                gk[x] = e;
                total[x] += e;
            }
        }
        /* CE = log S - (z_label - max); the gradient's per-pixel factor scale / S on valid pixels, 0 elsewhere */
        for (int64_t x = 0; x < W; ++x) {
            if (t[x] != c->ignore_index) {
                loss += (double)(u2pl_log(total[x]) - (z[t[x] * plane + x] - mx[x]));
                total[x] = c->scale / total[x];
            } else {
                total[x] = 0.0f;
            }
        }
        for (int64_t k = 0; k < C; ++k) {
            float *gk = g + k * plane;
            for (int64_t x = 0; x < W; ++x) gk[x] *= total[x];
        }
        for (int64_t x = 0; x < W; ++x)
            if (t[x] != c->ignore_index) g[t[x] * plane + x] -= c->scale;
    }
done:
    c->partial[worker] = loss;
    free(mx);
}

/* grad = scale * (softmax(logits) - onehot(target)) on valid pixels, 0 on ignored ones; *loss = sum of the valid
 * pixels' CE (not scaled). -1 if a target is neither ignore_index nor in [0, classes). */
int u2pl_ce_grad(const float *logits, const int64_t *target, float *grad, double *loss, int64_t batch,
                 int64_t classes, int64_t height, int64_t width, int64_t ignore_index, float scale, int threads) {
    double partial[MAX_THREADS] = {0};
    int bad[MAX_THREADS] = {0};
    ce_ctx c = {logits, target, grad, partial, bad, classes, height, width, ignore_index, scale};
    parallel_for(batch * height, threads, ce_rows, &c);
    int status = status_of(bad);
    if (status != 0) return status;
    double sum = 0.0;
    for (int t = 0; t < MAX_THREADS; ++t) sum += partial[t];
    *loss = sum;
    return 0;
}

/* ---- anchors against their sampled negatives ---- */
typedef struct {
    const float *scaled; const void *buffer; int bf16; const int64_t *index; const float *positive_logit;
    float *log_p0; float *p0_minus_1; float *grad; int *bad;
    int64_t rows, negatives, dim, buffer_rows;
} anchor_ctx;

static inline float bf16_to_float(uint16_t v) {
    union { uint32_t i; float f; } u;
    u.i = (uint32_t)v << 16;
    return u.f;
}

static void anchor_rows(void *arg, int64_t begin, int64_t end, int worker) {
    anchor_ctx *c = (anchor_ctx *)arg;
    const int64_t K = c->negatives, D = c->dim;
    float *logit = malloc(sizeof(float) * (K + D));
    if (!logit) { c->bad[worker] = NO_MEMORY; return; }
    float *acc = logit + K;
    for (int64_t m = begin; m < end; ++m) {
        const float *s = c->scaled + m * D;
        const int64_t *idx = c->index + m * K;
        for (int64_t k = 0; k < K; ++k) {
            if (idx[k] < 0 || idx[k] >= c->buffer_rows) { c->bad[worker] = BAD_INPUT; goto done; }
        }
        float best = c->positive_logit[m];
        for (int64_t k = 0; k < K; ++k) {
            /* random 1 KB rows: fetch the one PREFETCH_AHEAD rows on (this anchor's, then the next one's) while
               this one is summed, so that the memory latency overlaps the arithmetic */
            int64_t ahead = m * K + k + PREFETCH_AHEAD;
            if (ahead < end * K) {
                int64_t row_ahead = c->index[ahead];
                if (row_ahead >= 0 && row_ahead < c->buffer_rows) {
                    const char *p = (const char *)c->buffer + row_ahead * D * (c->bf16 ? 2 : 4);
                    for (int64_t off = 0; off < D * (c->bf16 ? 2 : 4); off += 64) __builtin_prefetch(p + off);
                }
            }
            float dot = 0.0f;
            if (c->bf16) {
                const uint16_t *row = (const uint16_t *)c->buffer + idx[k] * D;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < D; ++d) dot += s[d] * bf16_to_float(row[d]);
            } else {
                const float *row = (const float *)c->buffer + idx[k] * D;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < D; ++d) dot += s[d] * row[d];
            }
            logit[k] = dot;
            best = dot > best ? dot : best;
        }
        float total = u2pl_exp(c->positive_logit[m] - best);
        for (int64_t k = 0; k < K; ++k) total += u2pl_exp(logit[k] - best);
        float lse = best + u2pl_log(total);
        c->log_p0[m] = c->positive_logit[m] - lse;
        c->p0_minus_1[m] = u2pl_exp(c->positive_logit[m] - lse) - 1.0f;
        memset(acc, 0, sizeof(float) * D);
        for (int64_t k = 0; k < K; ++k) {
            float p = u2pl_exp(logit[k] - lse);
            if (c->bf16) {
                const uint16_t *row = (const uint16_t *)c->buffer + idx[k] * D;
                for (int64_t d = 0; d < D; ++d) acc[d] += p * bf16_to_float(row[d]);
            } else {
                const float *row = (const float *)c->buffer + idx[k] * D;
                for (int64_t d = 0; d < D; ++d) acc[d] += p * row[d];
            }
        }
        memcpy(c->grad + m * D, acc, sizeof(float) * D);
    }
done:
    free(logit);
}

/* For each of `rows` anchors (scaled = unit anchor / temperature, [rows, dim]) and its `negatives` queue rows
 * (index [rows, negatives] into buffer [buffer_rows, dim], fp32 or bf16): the logits [positive_logit, scaled .
 * row_k], log_p0 = log-softmax at the positive, p0_minus_1 = p_0 - 1 and grad = sum_k p_k row_k [rows, dim].
 * Returns -1 if an index is out of range. */
int u2pl_anchor_neg(const float *scaled, const void *buffer, int bf16, const int64_t *index,
                    const float *positive_logit, float *log_p0, float *p0_minus_1, float *grad, int64_t rows,
                    int64_t negatives, int64_t dim, int64_t buffer_rows, int threads) {
    int bad[MAX_THREADS] = {0};
    anchor_ctx c = {scaled, buffer, bf16, index, positive_logit, log_p0, p0_minus_1, grad, bad,
                    rows, negatives, dim, buffer_rows};
    parallel_for(rows, threads, anchor_rows, &c);
    return status_of(bad);
}

/* ---- teacher rows: unit rows for the queues, prototype sums ---- */
static inline uint16_t float_to_bf16(float value) {  /* round to nearest even, as torch's conversion */
    union { float f; uint32_t i; } u;
    u.f = value;
    if ((u.i & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u.i >> 16) | 0x40u);  /* NaN stays a quiet NaN */
    return (uint16_t)((u.i + 0x7fffu + ((u.i >> 16) & 1u)) >> 16);
}

typedef struct {
    const float *rows; const int64_t *label; void *unit; int bf16; double *sums; int64_t *counts; int *bad;
    int64_t dim, classes;
} rows_ctx;

static void prepare_rows(void *arg, int64_t begin, int64_t end, int worker) {
    rows_ctx *c = (rows_ctx *)arg;
    const int64_t D = c->dim, C = c->classes;
    double *sums = c->sums + (int64_t)worker * (C + 1) * D;  /* this worker's partial sums: no sharing */
    int64_t *counts = c->counts + (int64_t)worker * (C + 1);
    for (int64_t p = begin; p < end; ++p) {
        const float *row = c->rows + p * D;
        int64_t label = c->label[p];
        if (label < 0 || label > C) { c->bad[worker] = BAD_INPUT; return; }
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t d = 0; d < D; ++d) squares += row[d] * row[d];
        float norm = sqrtf(squares);
        float inverse = 1.0f / (norm > 1e-12f ? norm : 1e-12f);  /* F.normalize: x / max(|x|, 1e-12) */
        if (c->bf16) {
            uint16_t *out = (uint16_t *)c->unit + p * D;
            for (int64_t d = 0; d < D; ++d) out[d] = float_to_bf16(row[d] * inverse);
        } else {
            float *out = (float *)c->unit + p * D;
            for (int64_t d = 0; d < D; ++d) out[d] = row[d] * inverse;
        }
        if (label < C) {
            double *sum = sums + label * D;
            for (int64_t d = 0; d < D; ++d) sum[d] += row[d];
            counts[label] += 1;
        }
    }
}

/* rows [P, dim] fp32 -> unit [P, dim] (fp32 or bf16) = rows / max(|row|, 1e-12); sums [classes, dim] (fp64) and
 * counts [classes] of the rows with label c in [0, classes) (label == classes: none). Returns -1 for a label
 * outside [0, classes]. */
int u2pl_prepare_rows(const float *rows, const int64_t *label, void *unit, int bf16, double *sums, int64_t *counts,
                      int64_t num_rows, int64_t dim, int64_t classes, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    double *partial = calloc((size_t)threads * (classes + 1) * dim, sizeof(double));
    int64_t *partial_counts = calloc((size_t)threads * (classes + 1), sizeof(int64_t));
    int bad[MAX_THREADS] = {0};
    if (!partial || !partial_counts) { free(partial); free(partial_counts); return -2; }
    rows_ctx c = {rows, label, unit, bf16, partial, partial_counts, bad, dim, classes};
    parallel_for(num_rows, threads, prepare_rows, &c);
    int status = status_of(bad);
    for (int64_t k = 0; k < classes; ++k) {
        counts[k] = 0;
        for (int64_t d = 0; d < dim; ++d) sums[k * dim + d] = 0.0;
        for (int t = 0; t < threads; ++t) {
            counts[k] += partial_counts[(int64_t)t * (classes + 1) + k];
            const double *part = partial + ((int64_t)t * (classes + 1) + k) * dim;
            for (int64_t d = 0; d < dim; ++d) sums[k * dim + d] += part[d];
        }
    }
    free(partial);
    free(partial_counts);
    return status;
}

/* ---- the queue push ---- */
/* The queue is far larger than the caches and its rows are not read again this step: with AVX, rows go to memory
 * with streaming stores, which skip reading each destination line first (a third less memory traffic). */
static inline void copy_row(char *dst, const char *src, int64_t bytes) {
#ifdef __AVX__
    if ((bytes & 31) == 0 && ((uintptr_t)dst & 31) == 0) {
        for (int64_t off = 0; off < bytes; off += 32)
            _mm256_stream_si256((__m256i *)(dst + off), _mm256_loadu_si256((const __m256i *)(src + off)));
        return;
    }
#endif
    memcpy(dst, src, (size_t)bytes);
}

typedef struct {
    const char *features; const uint8_t *mask; int64_t mask_stride_class, mask_stride_row; char *buffer;
    const int64_t *offsets, *capacities; int64_t *write_ptr, *fill; int64_t rows, row_bytes;
} push_ctx;

static void push_classes(void *arg, int64_t begin, int64_t end, int worker) {
    (void)worker;
    push_ctx *c = (push_ctx *)arg;
    for (int64_t k = begin; k < end; ++k) {
        const uint8_t *mask = c->mask + k * c->mask_stride_class;
        int64_t count = 0;
        for (int64_t n = 0; n < c->rows; ++n) count += mask[n * c->mask_stride_row] != 0;
        int64_t capacity = c->capacities[k], skip = count > capacity ? count - capacity : 0;
        int64_t ptr = c->write_ptr[k], rank = 0, slot = ptr;
        char *region = c->buffer + c->offsets[k] * c->row_bytes;
        for (int64_t n = 0; n < c->rows && count; ++n) {
            if (!mask[n * c->mask_stride_row]) continue;
            if (rank++ < skip) continue;  /* only the newest `capacity` rows can survive */
            copy_row(region + slot * c->row_bytes, c->features + n * c->row_bytes, c->row_bytes);
            if (++slot == capacity) slot = 0;
        }
        c->write_ptr[k] = (ptr + count - skip) % capacity;
        c->fill[k] = c->fill[k] + count < capacity ? c->fill[k] + count : capacity;
    }
#ifdef __AVX__
    _mm_sfence();  /* the streaming stores are visible before the thread is joined */
#endif
}

/* Row n of features [rows, row_bytes] goes to each class k with mask[k, n] (a bool at mask + k * stride_class +
 * n * stride_row), in row order, into class k's ring (buffer rows offsets[k] .. + capacities[k]) at write_ptr[k];
 * write_ptr and fill are updated. Classes are independent, so they are split over the threads. Returns -1 (and
 * writes nothing) for a write pointer outside its ring or a capacity below 1. */
int u2pl_push(const void *features, const uint8_t *mask, int64_t stride_class, int64_t stride_row, void *buffer,
              const int64_t *offsets, const int64_t *capacities, int64_t *write_ptr, int64_t *fill, int64_t classes,
              int64_t rows, int64_t row_bytes, int threads) {
    for (int64_t k = 0; k < classes; ++k)
        if (capacities[k] < 1 || write_ptr[k] < 0 || write_ptr[k] >= capacities[k]) return -1;
    push_ctx c = {(const char *)features, mask, stride_class, stride_row, (char *)buffer, offsets, capacities,
                  write_ptr, fill, rows, row_bytes};
    parallel_for(classes, threads, push_classes, &c);
    return 0;
}

/* ---- the negatives' class mask ---- */
#define RANK_BLOCK 256
typedef struct {
    const float *prob; const int64_t *label; const uint8_t *high; uint8_t *negative; int *bad;
    int64_t batch, classes, pixels, blocks, num_labeled, low_rank, high_rank; float threshold;
} negative_ctx;

static void negative_blocks(void *arg, int64_t begin, int64_t end, int worker) {
    negative_ctx *c = (negative_ctx *)arg;
    const int64_t C = c->classes, HW = c->pixels;
    int32_t *rank = malloc(sizeof(int32_t) * C * RANK_BLOCK);
    if (!rank) { c->bad[worker] = NO_MEMORY; return; }
    for (int64_t item = begin; item < end; ++item) {
        int64_t n = item / c->blocks, x0 = (item % c->blocks) * RANK_BLOCK;
        int64_t width = HW - x0 < RANK_BLOCK ? HW - x0 : RANK_BLOCK;
        const float *p = c->prob + n * C * HW + x0;
        /* rank of class k in its pixel's stable descending order: the classes above it, ties to the lower class */
        for (int64_t k = 0; k < C; ++k) {
            int32_t *r = rank + k * RANK_BLOCK;
            const float *pk = p + k * HW;
            for (int64_t x = 0; x < width; ++x) r[x] = 0;
            for (int64_t j = 0; j < k; ++j) {
                const float *pj = p + j * HW;
                for (int64_t x = 0; x < width; ++x) r[x] += pj[x] >= pk[x];
            }
            for (int64_t j = k + 1; j < C; ++j) {
                const float *pj = p + j * HW;
                for (int64_t x = 0; x < width; ++x) r[x] += pj[x] > pk[x];
            }
        }
        const uint8_t *high = c->high + n * HW + x0;
        const int64_t *label = c->label + n * HW + x0;
        /* locals: the uint8 stores below may alias anything, so fields read in the loops would be reloaded */
        const float threshold = c->threshold;
        const int32_t low_rank = (int32_t)(c->low_rank < C ? c->low_rank : C), high_rank = (int32_t)c->high_rank;
        const int labeled = n < c->num_labeled;
        for (int64_t k = 0; k < C; ++k) {
            const int32_t *r = rank + k * RANK_BLOCK;
            const float *pk = p + k * HW;
            uint8_t *out = c->negative + (k * c->batch + n) * HW + x0;
            if (labeled) {  /* among the top low_rank, and not the pixel's own label */
                for (int64_t x = 0; x < width; ++x)
                    out[x] = (uint8_t)((high[x] != 0) & (pk[x] < threshold) & (r[x] < low_rank) & (label[x] != k));
            } else {  /* ranked in [low_rank, high_rank) */
                for (int64_t x = 0; x < width; ++x)
                    out[x] = (uint8_t)((high[x] != 0) & (pk[x] < threshold) & (r[x] >= low_rank)
                                       & (r[x] < high_rank));
            }
        }
    }
    free(rank);
}

/* negative [classes, batch, pixels] (bool, class-major): whether class k is a negative candidate at a pixel of
 * prob [batch, classes, pixels] (fp32): high[n, x] and prob < threshold, and k's rank among the pixel's classes (a
 * stable descending order: ties rank the lower class first) is below low_rank in the first num_labeled images,
 * where k is not label[n, x] either, or in [low_rank, high_rank) in the others. O(classes^2) per pixel: for the
 * class counts of segmentation benchmarks (19, 21). */
int u2pl_negative_mask(const float *prob, const int64_t *label, const uint8_t *high, uint8_t *negative,
                       int64_t batch, int64_t classes, int64_t pixels, int64_t num_labeled, int64_t low_rank,
                       int64_t high_rank, float threshold, int threads) {
    int bad[MAX_THREADS] = {0};
    int64_t blocks = (pixels + RANK_BLOCK - 1) / RANK_BLOCK;
    negative_ctx c = {prob, label, high, negative, bad, batch, classes, pixels, blocks, num_labeled, low_rank,
                      high_rank, threshold};
    parallel_for(batch * blocks, threads, negative_blocks, &c);
    return status_of(bad);
}
