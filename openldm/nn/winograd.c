/* The transforms of F(4x4, 3x3) Winograd convolutions (see winograd.py), each in one pass over memory.

Written for openldm and compiled on first use by openldm/nn/native.py; plain C with no library beyond
libc, called through ctypes. Each function takes a range [begin, end) of independent jobs so that the
caller can share a call's jobs among threads; built with OpenMP, each also has a `_shared` form that
shares all of a call's jobs among the threads of the OpenMP runtime the process has (native.py builds
so only where that runtime is PyTorch's: its waiting threads then take the jobs, where threads of
their own would compete with them for the cores). The tiles of a call are those of a band of tile rows
[row0, row0 + nrows) of every image; a band's tiles are numbered (image, tile row, tile column). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* B^T for F(4x4): r = B^T d of a column or row d of a tile (interpolation points 0, +-1, +-2). */
static inline void b4(const float d[6], float r[6]) {
    r[0] = 4 * d[0] - 5 * d[2] + d[4];
    r[1] = -4 * (d[1] + d[2]) + d[3] + d[4];
    r[2] = 4 * (d[1] - d[2]) - d[3] + d[4];
    r[3] = 2 * (d[3] - d[1]) - d[2] + d[4];
    r[4] = 2 * (d[1] - d[3]) - d[2] + d[4];
    r[5] = 4 * d[1] - 5 * d[3] + d[5];
}

/* A^T for F(4x4): r = A^T m of a column or row m of a transformed product. */
static inline void a4(const float m[6], float r[4]) {
    r[0] = m[0] + m[1] + m[2] + m[3] + m[4];
    r[1] = m[1] - m[2] + 2 * (m[3] - m[4]);
    r[2] = m[1] + m[2] + 4 * (m[3] + m[4]);
    r[3] = m[1] - m[2] + 8 * (m[3] - m[4]) + m[5];
}

/* B^T d B of each 6x6 tile d of the zero-padded input: x (N, C, H, W) -> out (36, C, N * nrows * cols),
   out[6 k + m] the transform's row k, column m. A job is one tile row of one channel of one image:
   job = (n * C + c) * nrows + r. Returns 1 when its scratch memory cannot be had, else 0. */
int winograd4_input(const float *restrict x, float *restrict out, int64_t N, int64_t C, int64_t H,
                    int64_t W, int64_t row0, int64_t nrows, int64_t cols, int64_t begin, int64_t end) {
    const int64_t width = cols * 4 + 2, tiles = N * nrows * cols, plane = C * tiles;
    float *rows = malloc(12 * width * sizeof(float));
    if (rows == NULL) return 1;
    float *vertical = rows + 6 * width;
    for (int64_t job = begin; job < end; ++job) {
        const int64_t r = job % nrows, c = (job / nrows) % C, n = job / (nrows * C);
        const float *image = x + (n * C + c) * H * W;
        for (int i = 0; i < 6; ++i) { /* padded rows: one zero row and column before the image */
            const int64_t y = 4 * (row0 + r) + i - 1;
            float *row = rows + i * width;
            if (y < 0 || y >= H) {
                memset(row, 0, width * sizeof(float));
                continue;
            }
            row[0] = 0.0f;
            memcpy(row + 1, image + y * W, W * sizeof(float));
            memset(row + W + 1, 0, (width - W - 1) * sizeof(float));
        }
        for (int64_t k = 0; k < width; ++k) { /* B^T down the columns */
            float d[6], t[6];
            for (int i = 0; i < 6; ++i) d[i] = rows[i * width + k];
            b4(d, t);
            for (int i = 0; i < 6; ++i) vertical[i * width + k] = t[i];
        }
        const int64_t first_tile = (n * nrows + r) * cols;
        for (int k = 0; k < 6; ++k) { /* B along the rows, tile by tile */
            const float *s = vertical + k * width;
            float *o = out + (int64_t)(6 * k) * plane + c * tiles + first_tile;
            for (int64_t q = 0; q < cols; ++q) {
                float t[6];
                b4(s + 4 * q, t);
                for (int m = 0; m < 6; ++m) o[m * plane + q] = t[m];
            }
        }
    }
    free(rows);
    return 0;
}

/* A^T m A + bias of each transformed product m: products (36, O, N * nrows * cols) -> the output's rows
   of the band in y (N, O, H, W), rows and columns past H and W left out; bias may be NULL. A job is
   one tile row of one output channel of one image: job = (n * O + o) * nrows + r. */
int winograd4_output(const float *restrict products, const float *restrict bias, float *restrict y,
                     int64_t N, int64_t O, int64_t H, int64_t W, int64_t row0, int64_t nrows, int64_t cols,
                     int64_t begin, int64_t end) {
    const int64_t tiles = N * nrows * cols, plane = O * tiles;
    float *down = malloc((24 * cols + 4 * cols) * sizeof(float)); /* A^T m: 4 x 6 rows; one output row */
    if (down == NULL) return 1;
    float *line = down + 24 * cols;
    for (int64_t job = begin; job < end; ++job) {
        const int64_t r = job % nrows, o = (job / nrows) % O, n = job / (nrows * O);
        const int64_t first_tile = (n * nrows + r) * cols;
        const float b = bias != NULL ? bias[o] : 0.0f;
        for (int m = 0; m < 6; ++m) { /* A^T down the columns */
            const float *p = products + (int64_t)m * plane + o * tiles + first_tile;
            for (int64_t q = 0; q < cols; ++q) {
                float column[6], u[4];
                for (int k = 0; k < 6; ++k) column[k] = p[6 * k * plane + q];
                a4(column, u);
                for (int a = 0; a < 4; ++a) down[(a * 6 + m) * cols + q] = u[a];
            }
        }
        for (int a = 0; a < 4; ++a) { /* A along the rows, then the row written whole */
            const int64_t row = 4 * (row0 + r) + a;
            if (row >= H) break;
            const float *u = down + a * 6 * cols;
            for (int64_t q = 0; q < cols; ++q) {
                float m[6], e[4];
                for (int l = 0; l < 6; ++l) m[l] = u[l * cols + q];
                a4(m, e);
                for (int k = 0; k < 4; ++k) line[4 * q + k] = e[k] + b;
            }
            memcpy(y + ((n * O + o) * H + row) * W, line, W * sizeof(float));
        }
    }
    free(down);
    return 0;
}

#ifdef _OPENMP
#include <omp.h>

/* The calling thread's share [*begin, *end) of jobs [0, jobs) in the enclosing parallel region. */
static void share_of(int64_t jobs, int64_t *begin, int64_t *end) {
    const int64_t threads = omp_get_num_threads(), step = (jobs + threads - 1) / threads;
    *begin = omp_get_thread_num() * step;
    *end = *begin + step < jobs ? *begin + step : jobs;
}

int winograd4_input_shared(const float *restrict x, float *restrict out, int64_t N, int64_t C, int64_t H,
                           int64_t W, int64_t row0, int64_t nrows, int64_t cols, int64_t jobs, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int64_t begin, end;
        share_of(jobs, &begin, &end);
        if (begin < end) failed |= winograd4_input(x, out, N, C, H, W, row0, nrows, cols, begin, end);
    }
    return failed;
}

int winograd4_output_shared(const float *restrict products, const float *restrict bias, float *restrict y,
                            int64_t N, int64_t O, int64_t H, int64_t W, int64_t row0, int64_t nrows,
                            int64_t cols, int64_t jobs, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int64_t begin, end;
        share_of(jobs, &begin, &end);
        if (begin < end) failed |= winograd4_output(products, bias, y, N, O, H, W, row0, nrows, cols, begin, end);
    }
    return failed;
}
#endif
