/* The transforms of F(4x4, 3x3) Winograd convolutions (see winograd.py), each in one pass over memory.

Written for openldm and compiled on first use by openldm/nn/native.py; plain C with no library beyond
libc, called through ctypes. Each function takes a range [begin, end) of independent jobs so that the
caller can share a call's jobs among threads. The tiles of a call are those of a band of tile rows
[row0, row0 + nrows) of every image; a band's tiles are numbered (image, tile row, tile column). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
        const float *d0 = rows, *d1 = d0 + width, *d2 = d1 + width, *d3 = d2 + width, *d4 = d3 + width,
                    *d5 = d4 + width;
        float *t0 = vertical, *t1 = t0 + width, *t2 = t1 + width, *t3 = t2 + width, *t4 = t3 + width,
              *t5 = t4 + width;
        for (int64_t k = 0; k < width; ++k) { /* B^T down the columns */
            const float a0 = d0[k], a1 = d1[k], a2 = d2[k], a3 = d3[k], a4 = d4[k], a5 = d5[k];
            t0[k] = 4 * a0 - 5 * a2 + a4;
            t1[k] = -4 * (a1 + a2) + a3 + a4;
            t2[k] = 4 * (a1 - a2) - a3 + a4;
            t3[k] = 2 * (a3 - a1) - a2 + a4;
            t4[k] = 2 * (a1 - a3) - a2 + a4;
            t5[k] = 4 * a1 - 5 * a3 + a5;
        }
        const int64_t first_tile = (n * nrows + r) * cols;
        for (int k = 0; k < 6; ++k) { /* B along the rows, tile by tile */
            const float *s = vertical + k * width;
            float *o0 = out + (int64_t)(6 * k) * plane + c * tiles + first_tile;
            float *o1 = o0 + plane, *o2 = o1 + plane, *o3 = o2 + plane, *o4 = o3 + plane, *o5 = o4 + plane;
            for (int64_t q = 0; q < cols; ++q) {
                const float *a = s + 4 * q;
                const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3], a4 = a[4], a5 = a[5];
                o0[q] = 4 * a0 - 5 * a2 + a4;
                o1[q] = -4 * (a1 + a2) + a3 + a4;
                o2[q] = 4 * (a1 - a2) - a3 + a4;
                o3[q] = 2 * (a3 - a1) - a2 + a4;
                o4[q] = 2 * (a1 - a3) - a2 + a4;
                o5[q] = 4 * a1 - 5 * a3 + a5;
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
            const float *p0 = products + (int64_t)m * plane + o * tiles + first_tile;
            const float *p1 = p0 + 6 * plane, *p2 = p1 + 6 * plane, *p3 = p2 + 6 * plane,
                        *p4 = p3 + 6 * plane, *p5 = p4 + 6 * plane;
            float *u0 = down + m * cols, *u1 = u0 + 6 * cols, *u2 = u1 + 6 * cols, *u3 = u2 + 6 * cols;
            for (int64_t q = 0; q < cols; ++q) {
                const float a0 = p0[q], a1 = p1[q], a2 = p2[q], a3 = p3[q], a4 = p4[q], a5 = p5[q];
                u0[q] = a0 + a1 + a2 + a3 + a4;
                u1[q] = a1 - a2 + 2 * (a3 - a4);
                u2[q] = a1 + a2 + 4 * (a3 + a4);
                u3[q] = a1 - a2 + 8 * (a3 - a4) + a5;
            }
        }
        for (int a = 0; a < 4; ++a) { /* A along the rows, then the row written whole */
            const int64_t row = 4 * (row0 + r) + a;
            if (row >= H) break;
            const float *m0 = down + a * 6 * cols, *m1 = m0 + cols, *m2 = m1 + cols, *m3 = m2 + cols,
                        *m4 = m3 + cols, *m5 = m4 + cols;
            for (int64_t q = 0; q < cols; ++q) {
                const float a0 = m0[q], a1 = m1[q], a2 = m2[q], a3 = m3[q], a4 = m4[q], a5 = m5[q];
                line[4 * q + 0] = a0 + a1 + a2 + a3 + a4 + b;
                line[4 * q + 1] = a1 - a2 + 2 * (a3 - a4) + b;
                line[4 * q + 2] = a1 + a2 + 4 * (a3 + a4) + b;
                line[4 * q + 3] = a1 - a2 + 8 * (a3 - a4) + a5 + b;
            }
            memcpy(y + ((n * O + o) * H + row) * W, line, W * sizeof(float));
        }
    }
    free(down);
    return 0;
}
